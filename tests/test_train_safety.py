"""Training never goes silently wrong: non-finite data, losses and weights stop the run (or are
skipped) before anything is saved, bad options and unreadable data are refused by name, a damaged
optimizer state is refused on resume, and a seed makes a run reproducible."""

import dataclasses
import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import fastddpm
from fastddpm import DDPM, NonFiniteError, Schedule, Trainer, TrainConfig, UNet, UNetConfig, load
from fastddpm.data import load_dataset

train_module = importlib.import_module("fastddpm.train")  # fastddpm.train is the function

TINY = UNetConfig(resolution=8, in_channels=1, out_channels=1, ch=8, ch_mult=(1,), num_res_blocks=1,
                  attn_resolutions=(), dropout=0.0, groups=4)


def _images(n=24):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _trainer(out, images=None, **kw):
    options = dict(batch_size=8, lr=1e-3, warmup=0, ema_decay=0.9, checkpoint_every=0, log_every=1)
    torch.manual_seed(0)
    return Trainer(DDPM(UNet(TINY), Schedule.linear(T=50)), _images() if images is None else images,
                   str(out), TrainConfig(**dict(options, **kw)))


def _poison(monkeypatch, trainer, bad_steps):
    """Make the loss NaN at the given (1-based) steps."""
    real = train_module.training_loss

    def loss(*args, **kwargs):
        value = real(*args, **kwargs)
        return value * float("nan") if trainer.step + 1 in bad_steps else value

    monkeypatch.setattr(train_module, "training_loss", loss)


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _log_lines(out):
    def refuse(token):
        raise AssertionError(f"log.jsonl holds the non-JSON token {token}")

    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


# ---------------------------------------------------------------------------------- data
def test_a_nan_pixel_is_refused_when_the_data_is_loaded(tmp_path):
    images = _images()
    images[5, 0, 3, 3] = float("nan")
    images[9, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"^data: .* 2 of 24 images \(the first at index 5\)"):
        fastddpm.train(images, out=str(tmp_path / "a"), steps=1, model_config=TINY, batch_size=8, progress=False)
    with pytest.raises(ValueError, match=r"^images: .* 2 of 24 images \(the first at index 5\)"):
        _trainer(tmp_path / "b", images)
    np.save(tmp_path / "x.npy", (images.numpy() + 1) / 2)
    with pytest.raises(ValueError, match=r"^data \(.*x\.npy\): .*the first at index 5"):
        load_dataset(str(tmp_path / "x.npy"))
    assert not os.path.exists(tmp_path / "a" / "checkpoint")


@pytest.mark.parametrize("case", ["truncated", "header", "object", "empty", "pickle", "bad npz"])
def test_unreadable_array_files_are_refused_naming_the_file(tmp_path, case):
    good = tmp_path / "good.npy"
    np.save(good, np.zeros((4, 8, 8), np.uint8))
    raw = good.read_bytes()
    path = tmp_path / ("bad.npz" if case == "bad npz" else "bad.npy")
    if case == "object":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif case == "pickle":
        with open(path, "wb") as f:
            f.write(b"\x80\x04K\x01.")
    else:
        path.write_bytes({"truncated": raw[:len(raw) // 2], "header": raw[:50], "empty": b"",
                          "bad npz": b"PK\x03\x04 not a zip"}[case])
    with pytest.raises(ValueError, match=rf"^data: {path} is not a readable image array"):
        load_dataset(str(path))


def test_a_file_named_png_that_is_not_an_image_is_refused_naming_it(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "x.png").write_text("not an image")
    with pytest.raises(ValueError, match=rf"^data: {tmp_path / 'x.png'} is not a readable image"):
        load_dataset(str(tmp_path), resolution=8, channels=1)


# ------------------------------------------------------------------------------- options
@pytest.mark.parametrize("name,value", [
    ("lr", float("inf")), ("lr", float("nan")), ("lr", "abc"), ("lr", 0), ("lr", None),
    ("grad_clip", float("nan")), ("grad_clip", float("inf")), ("grad_clip", -1),
    ("batch_size", True), ("batch_size", 0), ("batch_size", 8.0), ("warmup", -1), ("log_every", False),
    ("sample_steps", 0), ("ema_decay", float("nan")), ("ema_decay", 1.0), ("seed", -1), ("seed", 2 ** 40),
    ("seed", 1.5), ("amp", "fp8"), ("flip", 1), ("on_nonfinite", "ignore")])
def test_bad_options_are_refused_naming_them(name, value):
    with pytest.raises((ValueError, TypeError), match=f"^{name}: expected"):
        TrainConfig(**{name: value})


def test_good_edge_options_are_accepted():
    config = TrainConfig(grad_clip=0, lr=1, seed=2 ** 32 - 1, on_nonfinite="skip", batch_size=np.int64(4))
    assert config.grad_clip == 0.0 and config.lr == 1.0 and type(config.batch_size) is int
    assert TrainConfig(grad_clip=None).grad_clip == 0.0


def test_a_batch_larger_than_the_data_and_unknown_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^batch_size: expected at most the dataset size \(24 images\), got 32"):
        _trainer(tmp_path, batch_size=32)
    with pytest.raises(TypeError, match="^lrr: not a training option"):
        fastddpm.train(_images(), out=str(tmp_path), steps=1, model_config=TINY, lrr=1e-3)


# -------------------------------------------------------------------------- non-finite runs
def test_a_run_that_goes_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, checkpoint_every=2, log_every=0)
    _poison(monkeypatch, trainer, {4})
    trainer.train(2, progress=False)
    saved, saved_ema = _state(trainer.model), _state(trainer.ema)
    with pytest.raises(NonFiniteError, match=r"^training: .*NaN or infinite at step 4; the checkpoint .* "
                                             r"is left at step 2"):
        trainer.train(6, progress=False)
    assert trainer.step == 4  # found at the checkpoint of step 4, before it was written
    assert not all(torch.isfinite(p).all() for p in trainer.model.parameters())
    for ema, expected in ((False, saved), (True, saved_ema)):
        ddpm = load(trainer.checkpoint_path(), ema=ema)
        assert ddpm.step == 2
        for k, v in ddpm.model.state_dict().items():
            assert torch.isfinite(v).all() and torch.equal(v, expected[k]), k


def test_stop_reports_at_the_next_log(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, log_every=3)
    _poison(monkeypatch, trainer, {2})
    with pytest.raises(NonFiniteError, match="at step 2; no checkpoint was written"):
        trainer.train(5, progress=False)
    assert trainer.step == 3 and not os.path.exists(trainer.checkpoint_path())
    assert _log_lines(tmp_path) == []


def test_train_step_reports_at_once(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path)
    _poison(monkeypatch, trainer, {2})
    assert np.isfinite(trainer.train_step())
    with pytest.raises(NonFiniteError, match="at step 2"):
        trainer.train_step()


def test_non_finite_weights_are_never_saved(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.train(1, progress=False)
    with torch.no_grad():
        next(trainer.model.parameters())[0] = float("inf")
    with pytest.raises(NonFiniteError, match="weights became NaN or infinite by step 1; the checkpoint .* "
                                             "is left at step 1"):
        trainer.save_checkpoint()
    with pytest.raises(NonFiniteError, match="weights"):
        trainer.save_samples()
    assert torch.isfinite(next(load(trainer.checkpoint_path(), ema=False).model.parameters())).all()


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_skip_drops_the_bad_steps_and_goes_on(tmp_path, monkeypatch, grad_clip):
    trainer = _trainer(tmp_path, on_nonfinite="skip", grad_clip=grad_clip)
    _poison(monkeypatch, trainer, {3, 4})
    trainer.train(2, progress=False)
    weights, ema = _state(trainer.model), _state(trainer.ema)
    trainer.train(4, progress=False)
    assert trainer.nonfinite_steps() == 2
    for module, expected in ((trainer.model, weights), (trainer.ema, ema)):
        for k, v in module.state_dict().items():
            assert torch.equal(v, expected[k]), k
    assert all(float(s["step"]) == 2 for s in trainer.optimizer.state.values())  # Adam did not count them
    trainer.train(5, progress=False)
    assert any(not torch.equal(v, weights[k]) for k, v in trainer.model.state_dict().items())
    assert load(trainer.checkpoint_path()).step == 5
    lines = _log_lines(tmp_path)
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5]
    assert [line["loss"] is None for line in lines] == [False, False, True, True, False]
    assert [line["skipped"] for line in lines] == [0, 0, 1, 2, 2]
    assert len(trainer.losses) == 5


def test_a_skip_run_resumes_exactly(tmp_path, monkeypatch):
    straight = _trainer(tmp_path / "a", on_nonfinite="skip")
    _poison(monkeypatch, straight, {2})
    straight.train(4, progress=False)
    first = _trainer(tmp_path / "b", on_nonfinite="skip")
    _poison(monkeypatch, first, {2})
    first.train(3, progress=False)
    resumed = Trainer.resume(str(tmp_path / "b"), _images())
    assert resumed.optimizer.param_groups[0]["fused"] is True
    resumed.train(4, progress=False)
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_a_stop_run_can_be_resumed_under_skip_and_back(tmp_path):
    _trainer(tmp_path).train(2, progress=False)
    skipping = Trainer.resume(str(tmp_path), _images(), on_nonfinite="skip")
    skipping.train(3, progress=False)
    stopping = Trainer.resume(str(tmp_path), _images(), on_nonfinite="stop")
    assert stopping.optimizer.param_groups[0]["fused"] is None
    assert all(s["step"].device.type == "cpu" for s in stopping.optimizer.state.values())
    stopping.train(4, progress=False)
    assert load(str(tmp_path / "checkpoint")).step == 4


# --------------------------------------------------------------------------------- resume
def _damaged(kind, state):
    opt = dict(state["optimizer"])
    if kind == "no scaler":
        return {"optimizer": opt}
    if kind == "not a dict":
        return [opt]
    if kind == "extra group":
        return dict(state, optimizer=dict(opt, param_groups=opt["param_groups"] * 2))
    if kind == "group size":
        group = dict(opt["param_groups"][0], params=opt["param_groups"][0]["params"][:-1])
        return dict(state, optimizer=dict(opt, param_groups=[group]))
    if kind == "moment shape":
        entry = dict(opt["state"][0], exp_avg=torch.zeros(3))
        return dict(state, optimizer=dict(opt, state={**opt["state"], 0: entry}))
    if kind == "scaler keys":
        return dict(state, scaler={"scale": 1.0})
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["no scaler", "not a dict", "extra group", "group size", "moment shape",
                                  "scaler keys"])
def test_a_damaged_optimizer_state_is_refused_on_resume(tmp_path, monkeypatch, kind):
    _trainer(tmp_path).train(2, progress=False)
    real = train_module.read_checkpoint

    def read(path, **kwargs):
        ckpt = real(path, **kwargs)
        return dataclasses.replace(ckpt, optimizer=_damaged(kind, ckpt.optimizer))

    monkeypatch.setattr(train_module, "read_checkpoint", read)
    with pytest.raises(ValueError, match=r"^checkpoint: .* cannot be resumed: "):
        Trainer.resume(str(tmp_path), _images())


# ---------------------------------------------------------------------------------- seeds
def test_the_seed_alone_fixes_a_run(tmp_path):
    runs = {}
    for name, seed, global_seed in (("a", 0, 1), ("b", 0, 2), ("c", 1, 1)):
        torch.manual_seed(global_seed)
        fastddpm.train(_images(), out=str(tmp_path / name), steps=2, model_config=TINY, seed=seed, batch_size=8,
                       checkpoint_every=0, progress=False)
        runs[name] = load_file(str(tmp_path / name / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not all(torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])
    torch.manual_seed(7)
    before = torch.rand(3)
    torch.manual_seed(7)
    train_module._seeded_unet(TINY, 0)
    assert torch.equal(torch.rand(3), before)  # the global RNG is left as it was


def test_two_seeded_cli_runs_write_identical_weights(tmp_path):
    data = str(tmp_path / "tiny.npy")
    np.save(data, np.random.default_rng(0).integers(0, 256, (16, 8, 8)).astype(np.uint8))
    weights = []
    for name in ("a", "b"):
        out = str(tmp_path / name)
        cmd = [sys.executable, "-m", "fastddpm.cli", "train", "--data", data, "--out", out, "--preset", "digits",
               "--steps", "2", "--batch-size", "8", "--seed", "0", "--checkpoint-every", "0", "--quiet"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        weights.append(load_file(os.path.join(out, "checkpoint", "model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
