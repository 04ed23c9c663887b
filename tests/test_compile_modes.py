"""torch.compile's mode as a speed option: ``SpeedOptions(compile=MODE)`` / ``--compile MODE``,
validated once, and the mode ``torch.compile`` is given (on the CPU, and under the sampler's own
CUDA graphs, where Inductor's cudagraphs must not nest) — checked without compiling anything."""

import pytest
import torch

from fastddpm.cli import main
from fastddpm.sampling import SpeedOptions
from fastddpm.sampling.prepare import CPU_INDUCTOR_CONFIG, compile_mode, prepare_model


class _Recorder:
    """Stands in for torch.compile: records its keyword arguments, returns the model."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, **kwargs):
        self.calls.append(kwargs)
        return model


@pytest.fixture
def compile_calls(monkeypatch):
    recorder = _Recorder()
    monkeypatch.setattr(torch, "compile", recorder)
    return recorder.calls


@pytest.mark.parametrize("bad", ["max_autotune", "fast", "", None, 1, 0.5, ("max-autotune",)])
def test_bad_compile_modes_name_the_argument(bad):
    with pytest.raises(ValueError, match="^compile: expected one of"):
        SpeedOptions(compile=bad)


@pytest.mark.parametrize("mode, expected", [
    (True, None), ("default", None), ("reduce-overhead", "reduce-overhead"), ("max-autotune", "max-autotune"),
    ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs")])
def test_the_cpu_path_passes_the_mode_to_torch_compile(compile_calls, mode, expected):
    prepare_model(torch.nn.Conv2d(1, 1, 3), "cpu", SpeedOptions(compile=mode))
    (call,) = compile_calls
    assert call.get("mode") == expected and call["dynamic"] is False
    # the default mode runs Inductor's C++ wrapper on the CPU; a named mode brings its own options
    assert call.get("options") == (CPU_INDUCTOR_CONFIG if expected is None else None)


@pytest.mark.parametrize("mode, expected", [
    (True, None), ("reduce-overhead", None), ("max-autotune", "max-autotune-no-cudagraphs"),
    ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs")])
def test_under_the_samplers_cuda_graphs_no_inductor_cudagraphs_nest(mode, expected):
    assert compile_mode(SpeedOptions(compile=mode, cuda_graph=True)) == expected


def test_a_cuda_sampler_passes_the_graph_safe_mode(compile_calls):
    # preparing touches no CUDA tensor of a CPU model, so this runs without a GPU
    prepare_model(torch.nn.Conv2d(1, 1, 3), "cuda", SpeedOptions(compile="max-autotune", cuda_graph=True))
    (call,) = compile_calls
    assert call == {"mode": "max-autotune-no-cudagraphs", "dynamic": False}


def test_frozen_compiles_patch_the_modes_inductor_options(compile_calls):
    prepared = prepare_model(torch.nn.Conv2d(1, 1, 3), "cpu", SpeedOptions(compile="max-autotune", freeze=True))
    assert prepared._inductor_patch == {**torch._inductor.list_mode_options("max-autotune"), "freezing": True}


def test_the_cli_flag_takes_a_mode_and_rejects_others(tmp_path, capsys, monkeypatch):
    seen = []
    fake = lambda *args, **kw: seen.append(kw["options"]) or torch.zeros(2, 1, 8, 8)  # noqa: E731
    monkeypatch.setattr("fastddpm.sampling.sample", fake)
    assert main(["sample", "--compile", "max-autotune", "--quiet", "--out", str(tmp_path / "x.png")]) == 0
    assert [o.compile for o in seen] == ["max-autotune"]
    assert main(["sample", "--compile", "turbo", "--quiet", "--out", str(tmp_path / "x.png")]) == 2
    assert "compile: expected one of" in capsys.readouterr().err
