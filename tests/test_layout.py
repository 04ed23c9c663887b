"""The package's shape: no module reaches into another's private names, and the ops' backend
overrides are context variables with a clear error for a bad FASTDDPM_OPS."""

import ast
import os
import subprocess
import sys
import threading

import pytest
import torch

import fastddpm
from fastddpm import Schedule, ops

PACKAGE = os.path.dirname(fastddpm.__file__)


def _modules():
    # the package, and the benchmark suite (installed inside it as fastddpm.bench; beside it in a checkout)
    roots = [PACKAGE] + [d for d in [os.path.join(os.path.dirname(PACKAGE), "benchmarks")] if os.path.isdir(d)]
    for root, _, files in (entry for top in roots for entry in os.walk(top)):
        for name in files:
            if name.endswith(".py"):
                yield os.path.join(root, name)


def test_no_module_imports_a_private_name_of_another():
    offenders = []
    for path in _modules():
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            own = isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("fastddpm"))
            if own:
                parts = (node.module or "").split(".")
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                # the extension module _C is loaded in one place, by ops/native.py
                if any(p.startswith("_") for p in parts if p) or [n for n in private if n != "_C"]:
                    offenders.append(f"{os.path.relpath(path, PACKAGE)}:{node.lineno}")
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and isinstance(node.value, ast.Name) and node.value.id in ("ops", "reference", "native"):
                offenders.append(f"{os.path.relpath(path, PACKAGE)}:{node.lineno} ({node.value.id}.{node.attr})")
    assert not offenders, offenders


def test_an_invalid_fastddpm_ops_fails_the_first_op_call_not_the_import():
    code = ("import torch, fastddpm\n"
            "from fastddpm import ops\n"
            "try:\n"
            "    ops.group_norm_act(torch.randn(1, 4, 2, 2), None, None, 2)\n"
            "except ValueError as e:\n"
            "    print('ValueError', e)\n")
    env = dict(os.environ, FASTDDPM_OPS="fastest")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ValueError FASTDDPM_OPS: expected 'auto' or one of" in out.stdout and "'fastest'" in out.stdout


def test_use_backend_is_scoped_to_its_thread(monkeypatch):
    monkeypatch.delenv("FASTDDPM_OPS", raising=False)
    seen = {}
    with ops.use_backend("reference"):
        thread = threading.Thread(target=lambda: seen.setdefault("other", ops.forced_backend()))
        thread.start()
        thread.join()
        seen["here"] = ops.forced_backend()
    assert seen == {"here": "reference", "other": None}
    assert ops.forced_backend() is None
    with pytest.raises(ValueError, match="backend: expected 'auto' or one of"):
        with ops.use_backend("fastest"):
            pass


def test_ops_resolve_a_noise_source_once_and_refuse_two():
    table = Schedule.linear().table("noising", "cpu")
    x0, t = torch.randn(2, 3), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="give at most one noise source, got noise and generator"):
        ops.q_sample(x0, t, table, torch.randn(2, 3), generator=torch.Generator())
    with pytest.raises(TypeError, match="rng: expected a fastddpm.ops.PhiloxState"):
        ops.q_sample(x0, t, table, rng=7)
    g = torch.Generator().manual_seed(0)
    xt, noise = ops.q_sample(x0, t, table, generator=g, backend="reference")
    assert torch.equal(noise, torch.randn(2, 3, generator=torch.Generator().manual_seed(0)))
    torch.manual_seed(5)  # without a source: Philox seeded from torch's RNG, reproducibly
    a = ops.q_sample(x0, t, table)[0]
    torch.manual_seed(5)
    assert torch.equal(a, ops.q_sample(x0, t, table)[0])


@pytest.mark.skipif(not ops.winograd.available(), reason="native extension not built")
def test_the_winograd_op_checks_its_inputs():
    U = ops.winograd.transform_weight(torch.randn(4, 3, 3, 3))
    with pytest.raises(ValueError, match="x: expected a float32 CPU"):
        ops.winograd_conv3x3(torch.randn(1, 3, 4, 4, dtype=torch.float64), U)
    with pytest.raises(ValueError, match=r"U: expected a float32 \[16, 5, K\] table"):
        ops.winograd_conv3x3(torch.randn(1, 5, 4, 4), U)
    with pytest.raises(ValueError, match=r"bias: expected shape \(4,\)"):
        ops.winograd_conv3x3(torch.randn(1, 3, 4, 4), U, torch.zeros(3))
