"""benchmarks/gpu_check.sh and its phase scripts, dry-run on the CPU (tiny sizes, no CUDA graphs),
so a GPU session — rare and short — never dies on a typo in the prepared script."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def _env(tmp_path, **extra):
    return {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable,
            "OUT": str(tmp_path), **extra}


def _run(args, tmp_path, **extra):
    return subprocess.run(args, cwd=ROOT, env=_env(tmp_path, **extra), capture_output=True, text=True, timeout=300)


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0


def test_unknown_phases_are_refused_before_anything_runs(tmp_path):
    result = _run(["bash", SCRIPT, "latency-1,fast256"], tmp_path)
    assert result.returncode == 2 and "unknown phase 'fast256'" in result.stderr
    assert not os.listdir(tmp_path)


def test_a_dry_run_writes_each_phase_summary_and_summary_md(tmp_path):
    result = _run(["bash", SCRIPT, "latency-1"], tmp_path, GPU_CHECK_DEVICE="cpu", GPU_CHECK_TINY="1")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = (tmp_path / "summary.md").read_text()
    assert "| latency-1 | 75 s |" in summary and "eager fp32: **" in summary
    assert "with the reference ops" in (tmp_path / "latency-1.md").read_text()


def test_a_spent_budget_skips_the_phase_and_still_writes_the_summary(tmp_path):
    result = _run(["bash", SCRIPT, "latency-1"], tmp_path, GPU_CHECK_DEVICE="cpu", GPU_CHECK_TINY="1",
                  GPU_CHECK_BUDGET="20")
    assert result.returncode == 0
    assert "| skipped |" in (tmp_path / "phases.md").read_text()
    assert "| latency-1 |" in (tmp_path / "summary.md").read_text()
    assert not (tmp_path / "latency-1.md").exists()


def test_fast_256_dry_run_reports_images_per_second_and_tflops(tmp_path):
    result = _run([sys.executable, "-m", "benchmarks.gpu_fast", "fast-256", "--device", "cpu", "--tiny",
                   "--variants", "eager:1", "--out", str(tmp_path)], tmp_path)
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "fast-256.md").read_text()
    assert "digits 2 x 3 steps" in text and "images/s" in text and "TFLOP/s" in text


@pytest.mark.parametrize("variants", ["turbo:1", "default:0", "default", ""])
def test_bad_variants_name_the_flag(tmp_path, variants):
    result = _run([sys.executable, "-m", "benchmarks.gpu_fast", "fast-256", "--variants", variants,
                   "--out", str(tmp_path)], tmp_path)
    assert result.returncode == 2 and "--variants: expected" in result.stderr


def test_the_diffusers_summary_is_written_from_the_rows_a_run_printed(tmp_path):
    # a run cut at its limit has printed the rows of the settings it finished, and nothing else
    row = dict(name="ddpm-cifar10-32 batch 64, 200 steps: eager fp32", ref_s=3.0, fast_s=2.0, speedup=1.5,
               sample_s=2.5, sample_speedup=1.2, max_diff=1e-6, pipe_first_s=4.0, fast_first_s=3.0, sample_first_s=3.5)
    log = tmp_path / "diffusers.txt"
    log.write_text("== diffusers\nsome warning\n" + json.dumps(row) + "\ndiffusers (x): skipped\n")
    result = _run([sys.executable, "-m", "benchmarks.gpu_diffusers", "--from-log", str(log), "--out", str(tmp_path)],
                  tmp_path)
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "diffusers.md").read_text()
    assert "eager fp32: DDPMPipeline 3.00 s, accelerate(pipe) 2.00 s (**1.50x**), sample() 2.50 s (1.20x)" in text
    assert text.count("\n- ") == 1
