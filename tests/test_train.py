"""Training (Algorithm 1), EMA, checkpoints (atomic, verified) and exact resume."""

import os

import pytest
import torch

import fastddpm
from fastddpm import DDPM, Schedule, Trainer, TrainConfig, UNet, load, save
from fastddpm.checkpoint import CheckpointError
from fastddpm.data import load_digits_data

from conftest import randomize_zero_init


def test_training_on_digits_lowers_the_loss(tmp_path):
    images = load_digits_data()[0]
    torch.manual_seed(0)
    trainer = Trainer(DDPM(UNet.from_preset("digits"), Schedule.linear()), images, str(tmp_path),
                      TrainConfig(batch_size=64, lr=1e-3, warmup=20, ema_decay=0.99, checkpoint_every=0))
    trainer.train(300, progress=False)
    first, last = sum(trainer.losses[:20]) / 20, sum(trainer.losses[-50:]) / 50
    assert first > 0.6 and last < 0.5 * first, (first, last)


def _small_trainer(out, images, **kw):
    torch.manual_seed(0)
    cfg = TrainConfig(batch_size=16, lr=1e-3, warmup=2, ema_decay=0.9, checkpoint_every=0, **kw)
    return Trainer(DDPM(UNet.from_preset("digits"), Schedule.linear(T=100)), images, str(out), cfg)


def test_resume_continues_exactly(tmp_path):
    images = load_digits_data()[0][:100]
    straight = _small_trainer(tmp_path / "a", images)
    straight.train(6, progress=False)

    first = _small_trainer(tmp_path / "b", images)
    first.train(3, progress=False)
    resumed = Trainer.resume(str(tmp_path / "b"), images)
    assert resumed.step == 3
    assert resumed.optimizer.state_dict()["state"][0]["step"] == 3
    resumed.train(6, progress=False)

    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight.ema.parameters(), resumed.ema.parameters()):
        assert torch.equal(a, b)


def test_save_load_gives_identical_outputs(tmp_path):
    model = randomize_zero_init(UNet.from_preset("digits")).eval()
    ema = randomize_zero_init(UNet.from_preset("digits"), seed=1).eval()
    save(model, str(tmp_path / "ck"), ema=ema, schedule=Schedule.cosine(T=500))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 400])
    loaded = load(str(tmp_path / "ck"), ema=False)
    assert loaded.schedule.T == 500 and loaded.schedule.config.kind == "cosine"
    with torch.no_grad():
        assert torch.equal(loaded.model(x, t), model(x, t))
        assert torch.equal(load(str(tmp_path / "ck")).model(x, t), ema(x, t))


def test_broken_checkpoints_are_reported_not_half_loaded(tmp_path):
    model = UNet.from_preset("digits")
    path = save(model, str(tmp_path / "ck"))
    weights = os.path.join(path, "model.safetensors")
    data = bytearray(open(weights, "rb").read())
    data[-10] ^= 0xFF
    open(weights, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load(path)
    os.remove(weights)
    with pytest.raises(CheckpointError, match="missing"):
        load(path)
    open(os.path.join(path, "config.json"), "w").write("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load(path)


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = randomize_zero_init(UNet.from_preset("digits"))
    path = save(model, str(tmp_path / "ck"))

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(fastddpm.checkpoint, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save(UNet.from_preset("digits"), path)
    monkeypatch.undo()
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([5])
    with torch.no_grad():
        assert torch.equal(load(path).model(x, t), model.eval()(x, t))
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_train_config_validation():
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="fp8")
    with pytest.raises(ValueError, match="steps"):
        fastddpm.train("digits", out="/tmp/unused", steps=0)


def test_ema_is_warmed_up_then_follows_the_configured_decay(tmp_path):
    images = load_digits_data()[0][:64]
    trainer = _small_trainer(tmp_path, images)
    trainer.config.ema_decay = 0.999
    assert trainer.ema_decay() == pytest.approx(0.1)
    before = [p.clone() for p in trainer.ema.parameters()]
    trainer.train_step()
    for e, p, b in zip(trainer.ema.parameters(), trainer.model.parameters(), before):
        torch.testing.assert_close(e, 0.1 * b + 0.9 * p)
    trainer.step = 100000
    assert trainer.ema_decay() == 0.999
