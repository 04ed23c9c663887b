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


def test_bench_merge_adds_sections_to_an_existing_report(tmp_path):
    """``--merge`` (a partial rerun) keeps the sections already in --out and replaces the ones run."""
    assert main(["bench", "--quick", "--only", "ops", "--rounds", "1", "--out", str(tmp_path)]) == 0
    first = json.loads((tmp_path / "bench.json").read_text())
    first["sections"]["train"] = {"skipped": "kept from an earlier run", "rows": [], "wall_s": 0.0}
    (tmp_path / "bench.json").write_text(json.dumps(first))
    assert main(["bench", "--quick", "--only", "ops", "--rounds", "1", "--out", str(tmp_path), "--merge"]) == 0
    merged = json.loads((tmp_path / "bench.json").read_text())
    assert merged["sections"]["train"]["skipped"] == "kept from an earlier run" and merged["sections"]["ops"]["rows"]
    assert "kept from an earlier run" in (tmp_path / "bench.md").read_text()


@pytest.mark.parametrize("argv", [
    ["reconstruct", "--input", "mnist:0-3", "--t", "100,500", "--steps", "5"],
    ["interpolate", "--input", "mnist:0", "--input-b", "mnist:600", "--t", "300", "--steps", "5",
     "--lambdas", "0,0.5,1", "--mode", "slerp"],
    ["denoise", "--input", "mnist:0-3", "--add-noise", "0.3", "--steps", "5"],
    ["inpaint", "--input", "mnist:0-3", "--region", "center", "--steps", "6", "--resample", "2", "--jump", "3"],
    ["progressive", "--n", "2", "--steps", "10", "--every", "5"],
    ["shared", "--t", "5,10", "--samples", "2", "--steps", "5"],
])
def test_edit_commands_write_a_grid(tmp_path, capsys, argv):
    out = tmp_path / "edit.png"
    assert main(["edit", *argv, "--out", str(out), "--quiet"]) == 0
    from PIL import Image

    with Image.open(out) as im:
        assert im.size[0] > 64 and im.size[1] > 64
    assert f"wrote {argv[0]}" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["reconstruct", "--t", "1001"], "t: expected an int in [0, 1000]"),
    (["reconstruct", "--input", "mnist:9999"], "expected indices in [0, 5000)"),
    (["reconstruct", "--input", "nope.png"], "neither an image file nor a bundled item"),
    (["interpolate", "--lambdas", "0,2"], "input-b: interpolate needs --input-b"),
    (["interpolate", "--input-b", "mnist:1-8", "--lambdas", "0,2"], "lambdas: expected"),
    (["denoise", "--sigma", "-1"], "sigma: expected a positive number"),
    (["inpaint", "--mask", "missing.png"], "mask: 'missing.png' is not a file"),
])
def test_edit_commands_report_user_errors_in_one_line(capsys, argv, message):
    assert main(["edit", *argv, "--steps", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
