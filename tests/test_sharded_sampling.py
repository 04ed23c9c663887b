"""``fastddpm sample --out-dir``: 2 torchrun ranks (gloo, CPU) write the same images as 1 process
with another batch size, bit for bit; an interrupted run, restarted, ends with every index once."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastddpm import UNet, UNetConfig, save
from fastddpm.cli import main

from conftest import randomize_zero_init

TINY = UNetConfig(resolution=8, in_channels=1, out_channels=1, ch=8, ch_mult=(1,), num_res_blocks=1,
                  attn_resolutions=(), groups=4, dropout=0.0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    return save(randomize_zero_init(UNet(TINY)), str(tmp_path_factory.mktemp("ck") / "tiny"))


def _args(ck, out, *extra):
    return ["sample", "--model", ck, "-n", "8", "--steps", "5", "--seed", "3", "--out-dir", str(out),
            "--shard-size", "4", "--quiet", "--threads", "1", *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stacked(folder) -> np.ndarray:
    with open(folder / "manifest.json") as f:
        files = json.load(f)["files"]
    return np.concatenate([np.load(folder / name) for name in files if name.endswith(".npy")])


@pytest.mark.parametrize("source", ["generator", "philox"])
def test_two_ranks_write_the_images_of_one_process(tmp_path, checkpoint, source):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_args(checkpoint, one, "--format", "npy", "--batch-size", "8", "--noise-source", source)) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "fastddpm.cli",
                          *_args(checkpoint, two, "--format", "npy", "--batch-size", "3", "--noise-source", source)],
                         env=env, capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)  # not the checkout: "-m fastddpm.cli" would import its sources, maybe unbuilt
    assert run.returncode == 0, run.stderr[-2000:]
    assert sorted(os.listdir(two)) == sorted(os.listdir(one)) == \
        ["manifest.json", "run.json", "shard_000000-000003.npy", "shard_000004-000007.npy"]
    a, b = _stacked(one), _stacked(two)
    assert a.shape == (8, 1, 8, 8) and np.array_equal(a, b)  # bit for bit
    assert "rank 0 of 2 sampled 4 images" in run.stdout


def test_an_interrupted_run_resumes_without_losing_or_repeating_an_index(tmp_path, checkpoint):
    out = tmp_path / "run"
    assert main(_args(checkpoint, out, "--format", "both", "--batch-size", "3")) == 0
    pngs = {name: (out / name).read_bytes() for name in os.listdir(out) if name.endswith(".png")}
    full = np.load(out / "shard_000004-000007.npy")
    # as a kill leaves it: images and a shard missing, a temporary half file, no manifest
    for name in ("000001.png", "000006.png", "shard_000004-000007.npy", "manifest.json"):
        os.remove(out / name)
    (out / ".000006.png.tmp").write_bytes(b"half a PNG")
    assert main(_args(checkpoint, out, "--format", "both", "--batch-size", "5")) == 0
    with open(out / "manifest.json") as f:
        files = json.load(f)["files"]
    assert files == [f"{i:06d}.png" for i in range(4)] + ["shard_000000-000003.npy"] + \
        [f"{i:06d}.png" for i in range(4, 8)] + ["shard_000004-000007.npy"]
    assert sorted(n for n in os.listdir(out) if not n.startswith(".")) == sorted(files + ["manifest.json", "run.json"])
    assert {name: (out / name).read_bytes() for name in pngs} == pngs  # rewritten images are the same
    assert np.array_equal(np.load(out / "shard_000004-000007.npy"), full)
    assert not (out / ".000006.png.tmp").exists()


def test_a_folder_of_another_run_is_refused(tmp_path, checkpoint, capsys):
    out = tmp_path / "run"
    assert main(_args(checkpoint, out, "--format", "npy")) == 0
    assert main(_args(checkpoint, out, "--format", "npy", "--seed", "4")) == 2
    assert "holds images of another run" in capsys.readouterr().err
