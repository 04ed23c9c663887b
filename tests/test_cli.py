"""The ``fastddpm`` command."""

import json

import pytest
from PIL import Image

from fastddpm import UNet, save
from fastddpm.cli import main

from conftest import randomize_zero_init


def test_info_lists_versions_and_backends(capsys):
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "reference" in data["op_backends"] and data["torch"]


def test_sample_writes_a_png(tmp_path, capsys):
    ck = save(randomize_zero_init(UNet.from_preset("digits")), str(tmp_path / "ck"))
    out = tmp_path / "s.png"
    assert main(["sample", "--model", ck, "--n", "4", "--steps", "5", "--out", str(out),
                 "--quiet", "--scale", "1", "--npy", str(tmp_path / "s.npy")]) == 0
    assert Image.open(out).size == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2)
    assert (tmp_path / "s.npy").exists()


def test_train_then_resume(tmp_path):
    out = str(tmp_path / "run")
    assert main(["train", "--data", "digits", "--out", out, "--steps", "3", "--batch-size", "8",
                 "--quiet"]) == 0
    assert main(["train", "--data", "digits", "--out", out, "--steps", "5", "--resume", "--quiet"]) == 0
    with open(f"{out}/checkpoint/config.json") as f:
        cfg = json.load(f)
    assert cfg["step"] == 5 and cfg["train"]["batch_size"] == 8


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    assert main(["sample", "--model", str(tmp_path / "missing"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["sample", "--model", str(tmp_path), "--n", "0", "--quiet"]) == 2


def test_bench_quick_writes_json_markdown_and_plot(tmp_path):
    """``fastddpm bench`` end to end on its smallest section: files written, rows checked and timed."""
    assert main(["bench", "--quick", "--only", "ops", "--rounds", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    rows = result["sections"]["ops"]["rows"]
    assert rows and all(r["fast_s"] > 0 and r["speedup"] > 0 for r in rows)
    assert any("frac_of_copy" in r for r in rows)
    assert "| case |" in (tmp_path / "bench.md").read_text()


def test_bench_rejects_unknown_sections(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--only", "opz", "--out", str(tmp_path)])
    assert "unknown sections ['opz']" in capsys.readouterr().err
