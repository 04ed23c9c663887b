"""pytest-benchmark: the three ops and the U-Net forward, reference and fast path side by side.

    pytest --import-mode=importlib benchmarks [--quick] [--benchmark-disable]

(importlib mode keeps the repository root off sys.path, so the installed package, with its
compiled extension, is what gets timed.)

Each fast path is checked against the reference on the same inputs before it is timed.
"""

import pytest
import torch

from fastddpm.bench.ops import check_close, op_cases, unet_cases

DEVICE = torch.device("cpu")
NAMES = [c["name"] for c in op_cases(DEVICE, True) + unet_cases(DEVICE, True)]


@pytest.fixture(scope="module")
def cases(quick):
    return {i: c for i, c in enumerate(op_cases(DEVICE, quick) + unet_cases(DEVICE, quick))}


@pytest.mark.parametrize("path", ["reference", "auto"])
@pytest.mark.parametrize("case", range(len(NAMES)), ids=NAMES)
def test_op(benchmark, cases, case, path):
    c = cases[case]
    fn = c["ref"] if path == "reference" else (lambda: c["fast"](path))
    if path != "reference" and c["tol"] is not None:
        check_close(fn(), c["ref"](), c["name"], c["tol"])
    benchmark.group = c["name"].split(" ")[0] + " " + c["name"].split(" ")[1]  # per op / per preset
    benchmark.extra_info["case"] = c["name"]
    benchmark(fn)


def test_fast_paths_are_native():
    """The fast column must time the compiled kernels, not silently the reference again."""
    import os

    from fastddpm import ops

    if os.environ.get("FASTDDPM_NATIVE") != "0":
        assert not ops.native_status().startswith("unavailable"), ops.native_status()
