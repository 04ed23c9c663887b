"""``fastddpm train`` under torchrun (CPU, gloo, 2 processes): the same steps as one process on the
same global batch, checkpoints that resume on another number of processes, and a killed rank
that leaves the last checkpoint loadable.

The runs are real ``python -m torch.distributed.run --standalone`` launches of the command, as a
user types them; the one-process runs they are compared with go through ``fastddpm.train``."""

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import fastddpm

train_module = importlib.import_module("fastddpm.train")  # fastddpm.train is the function

# the rows of a 2-process all-reduce are summed in another order than one process's batch mean
# gradient: the weights agree to float32 rounding (measured: 6.6e-7 after 3 Adam steps, 8.1e-7 after
# 3 more in one process), while 3 steps move them by 3e-3
ATOL = 5e-6
OPTIONS = dict(batch_size=8, lr=1e-3, warmup=0, ema_decay=0.9, seed=3, flip=True)
TIMEOUT = 240  # seconds for one launch; a hung rank fails the test instead of the suite


def _env():
    # one thread per process: two ranks share two cores with whatever else runs
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _torchrun_cmd(data, out, steps, *extra):
    options = ["--batch-size", "8", "--lr", "1e-3", "--warmup", "0", "--ema-decay", "0.9", "--seed", "3",
               "--flip", "--quiet", "--device", "cpu", "--threads", "1"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "fastddpm.cli", "train", "--data", data, "--out", out, "--preset", "digits",
            "--steps", str(steps), *options, *extra]


def _torchrun(data, out, steps, *extra) -> str:
    done = subprocess.run(_torchrun_cmd(data, out, steps, *extra), capture_output=True, text=True,
                          timeout=TIMEOUT, env=_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _one_process(data, out, steps, **kw):
    torch.set_num_threads(1)
    fastddpm.train(data, out=out, steps=steps, preset="digits", checkpoint_every=0, progress=False,
                   **dict(OPTIONS, **kw))


def _weights(out):
    ckpt = os.path.join(out, "checkpoint")
    return {name: load_file(os.path.join(ckpt, f"{name}.safetensors")) for name in ("model", "ema")}


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[n][k] - b[n][k]).abs().max().item() for n in a for k in a[n])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """32 random 8x8 images; one-process runs of 3 and 6 steps; a 2-process run of 3 steps."""
    root = tmp_path_factory.mktemp("ddp")
    data = str(root / "images.npy")
    np.save(data, np.random.default_rng(0).integers(0, 256, (32, 8, 8)).astype(np.uint8))
    paths = {name: str(root / name) for name in ("one3", "one6", "two3")}
    _one_process(data, paths["one3"], 3)
    _one_process(data, paths["one6"], 6)
    stdout = _torchrun(data, paths["two3"], 3, "--checkpoint-every", "0")
    return dict(paths, data=data, root=root, stdout=stdout)


def test_two_processes_take_the_steps_of_one_on_the_same_global_batch(runs):
    one, two = _weights(runs["one3"]), _weights(runs["two3"])
    assert fastddpm.load(runs["one3"]).step == 3 and fastddpm.load(runs["two3"]).step == 3
    assert _max_diff(one, two) < ATOL
    # not vacuous: 3 steps moved the weights from their seeded start by far more than that
    start = train_module._seeded_unet(fastddpm.PRESETS["digits"], OPTIONS["seed"]).state_dict()
    assert _max_diff({"model": one["model"]}, {"model": start}) > 100 * ATOL
    assert runs["stdout"].count("trained to step 3") == 1  # rank 0 alone reports


def test_the_global_batch_must_split_evenly_over_the_processes():
    with pytest.raises(ValueError, match=r"^batch_size: .* multiple of the number of processes \(2\), got 7"):
        train_module._check_split(7, 2)
    train_module._check_split(8, 2)


def test_a_two_process_checkpoint_resumes_in_one_process_as_an_uninterrupted_run(runs):
    out = str(runs["root"] / "two_then_one")
    shutil.copytree(runs["two3"], out)
    torch.set_num_threads(1)
    fastddpm.train(runs["data"], out=out, steps=6, preset="digits", resume=True, progress=False)
    assert fastddpm.load(out).step == 6
    assert _max_diff(_weights(out), _weights(runs["one6"])) < ATOL


def test_a_one_process_checkpoint_resumes_in_two_processes_as_an_uninterrupted_run(runs):
    out = str(runs["root"] / "one_then_two")
    shutil.copytree(runs["one3"], out)
    _torchrun(runs["data"], out, 6, "--resume")
    assert fastddpm.load(out).step == 6
    assert _max_diff(_weights(out), _weights(runs["one6"])) < ATOL
    with open(os.path.join(out, "log.jsonl")) as f:  # rank 0 alone logs (none at these steps)
        assert [json.loads(line) for line in f] == []


def _children(pid):
    """The pids of ``pid``'s child processes."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def _rank_pid(launcher, rank):
    """The pid of torchrun's worker with RANK ``rank``, or None while it is not started."""
    for child in _children(launcher):
        try:
            with open(f"/proc/{child}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return child
    return None


def _wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="finds the ranks through /proc")
def test_killing_one_rank_leaves_the_last_checkpoint_loadable(runs):
    out = str(runs["root"] / "killed")
    launcher = subprocess.Popen(_torchrun_cmd(runs["data"], out, 100000, "--checkpoint-every", "2"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    try:
        config = os.path.join(out, "checkpoint", "config.json")
        _wait_for(lambda: os.path.exists(config) or launcher.poll() is not None, TIMEOUT, "a first checkpoint")
        assert launcher.poll() is None, launcher.communicate()[1][-3000:]
        victim = _rank_pid(launcher.pid, 1)
        assert victim is not None
        time.sleep(0.5)  # a few more steps and checkpoints: the kill may fall inside a write
        os.kill(victim, signal.SIGKILL)
        launcher.communicate(timeout=TIMEOUT)  # rank 0 is torn down, not left waiting for rank 1
    finally:
        if launcher.poll() is None:  # a failed check above: end the launch and its ranks
            workers = _children(launcher.pid)
            launcher.terminate()  # torchrun stops its workers on SIGTERM
            try:
                launcher.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            for pid in [launcher.pid, *workers]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    assert launcher.returncode != 0
    ddpm = fastddpm.load(out)
    assert ddpm.step >= 2 and ddpm.step % 2 == 0
    # and training goes on from it, in one process
    torch.set_num_threads(1)
    fastddpm.train(runs["data"], out=out, steps=ddpm.step + 1, preset="digits", resume=True, progress=False)
    assert fastddpm.load(out).step == ddpm.step + 1


# Run by torchrun: fastddpm.train (the Python API) twice in one process group, with a loss that is
# NaN on rank 1 alone at step 3 while its gradients stay finite, so the ranks disagree unless
# the trainer makes them agree.
NAN_ON_ONE_RANK = """
import importlib, os, sys
import torch
import fastddpm
from fastddpm import NonFiniteError, UNetConfig

train_module = importlib.import_module("fastddpm.train")
real, calls, rank = train_module.training_loss, [0], int(os.environ["RANK"])


def loss(*args, **kwargs):
    value = real(*args, **kwargs)
    calls[0] += 1
    if rank == 1 and calls[0] == 3:
        return value + (float("nan") - value).detach()  # a NaN value, the gradients of value
    return value


train_module.training_loss = loss
data, root = sys.argv[1:]
tiny = UNetConfig(resolution=8, in_channels=1, out_channels=1, ch=8, ch_mult=(1,), num_res_blocks=1,
                  attn_resolutions=(), dropout=0.0, groups=4)
options = dict(model_config=tiny, batch_size=8, lr=1e-3, warmup=0, grad_clip=0, log_every=4, progress=False)
ddpm = fastddpm.train(data, out=root + "/skip", steps=4, on_nonfinite="skip", checkpoint_every=0, **options)
torch.save(ddpm.model.state_dict(), f"{root}/skip_ema_rank{rank}.pt")
calls[0] = 0
try:
    fastddpm.train(data, out=root + "/stop", steps=4, on_nonfinite="stop", checkpoint_every=2, **options)
except NonFiniteError as e:
    open(f"{root}/stop_rank{rank}.txt", "w").write(str(e))
"""


def test_a_nan_loss_on_one_rank_is_every_ranks(runs, tmp_path):
    script = tmp_path / "nan_on_one_rank.py"
    script.write_text(NAN_ON_ONE_RANK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), runs["data"], str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # "skip": both ranks skipped step 3, so their replicas (and EMAs) are still equal
    ema = [torch.load(tmp_path / f"skip_ema_rank{r}.pt") for r in (0, 1)]
    assert all(torch.equal(ema[0][k], ema[1][k]) for k in ema[0])
    with open(tmp_path / "skip" / "log.jsonl") as f:
        assert [json.loads(line)["skipped"] for line in f] == [1]
    # "stop": both ranks stopped at the same log, naming step 3, before the step-4 checkpoint
    for r in (0, 1):
        assert "at step 3" in (tmp_path / f"stop_rank{r}.txt").read_text()
    assert fastddpm.load(str(tmp_path / "stop")).step == 2
