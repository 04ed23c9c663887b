"""Training's speed options: in-kernel Philox noise for the loss (noise="philox") and the compiled
model (compile=True), against the plain eager trainer."""

import pytest
import torch

from fastddpm import DDPM, Schedule, Trainer, TrainConfig, UNet, ops, training_loss
from fastddpm.data import load_digits_data
from fastddpm.ops import PhiloxState
from fastddpm.train import _philox_base, _step_seed


def _trainer(out, images, **kw):
    torch.manual_seed(0)
    cfg = TrainConfig(batch_size=16, lr=1e-3, warmup=2, ema_decay=0.9, checkpoint_every=0, **kw)
    return Trainer(DDPM(UNet.from_preset("digits"), Schedule.linear(T=100)), images, str(out), cfg)


def test_train_config_checks_the_new_options():
    with pytest.raises(ValueError, match="noise"):
        TrainConfig(noise="randn")
    with pytest.raises(TypeError, match="compile"):
        TrainConfig(compile=1)


def test_training_loss_draws_eps_in_kernel_from_rng():
    """The loss with rng= equals the loss with the noise that stream holds, drawn by the oracle."""
    torch.manual_seed(0)
    model = UNet.from_preset("digits").eval()
    x0, t, sched = torch.randn(4, 1, 8, 8), torch.tensor([0, 5, 50, 99]), Schedule.linear(T=100)
    noise = PhiloxState(7, base=0).randn(x0.shape)  # the oracle's draw of stream (7, 0)
    expected = training_loss(model, sched, x0, t=t, noise=noise)
    for backend in ops.available_backends():
        if backend == "triton":
            continue  # its q_sample is tested against the oracle in test_triton_ops.py
        with ops.use_backend(backend):
            got = training_loss(model, sched, x0, t=t, rng=PhiloxState(7, base=0))
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="noise / rng"):
        training_loss(model, sched, x0, t=t, noise=noise, rng=PhiloxState(7))


def test_philox_noise_of_each_rank_is_its_rows_of_the_global_draw():
    """What a torchrun run promises: rank r's in-kernel draw (base = its first row's number) is rows
    [r b/N, (r+1) b/N) of the one-process draw, so the noise per global batch does not depend on N."""
    shape, seed = (8, 3, 4, 5), _step_seed(3, 11)
    whole = PhiloxState(seed, base=0).randn(shape)
    for world in (2, 4):
        rows = shape[0] // world
        for rank in range(world):
            x0 = torch.zeros((rows, *shape[1:]))
            table = torch.tensor([[0.0, 1.0]])  # x_t = eps
            xt, eps = ops.q_sample(x0, torch.zeros(rows, dtype=torch.int64), table,
                                   rng=PhiloxState(seed, base=rank * rows * x0[0].numel()))
            assert torch.equal(eps, whole[rank * rows:(rank + 1) * rows])


def test_philox_noise_refuses_a_split_inside_a_philox_block():
    assert _philox_base(0, 75) == 0 and _philox_base(4, 75) == 300
    with pytest.raises(ValueError, match="noise: 'philox'"):
        _philox_base(1, 75)


def test_philox_noise_trains_and_resumes_exactly(tmp_path):
    images = load_digits_data()[0][:100]
    plain = _trainer(tmp_path / "p", images)
    plain.train(2, progress=False)
    straight = _trainer(tmp_path / "a", images, noise="philox")
    straight.train(4, progress=False)
    assert straight.losses[:2] != plain.losses[:2]  # other noise than the generator's
    first = _trainer(tmp_path / "b", images, noise="philox")
    first.train(2, progress=False)
    resumed = Trainer.resume(str(tmp_path / "b"), images)
    assert resumed.config.noise == "philox"
    resumed.train(4, progress=False)
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_a_compiled_training_step_equals_the_eager_one(tmp_path):
    images = load_digits_data()[0][:64]
    eager = _trainer(tmp_path / "e", images)
    compiled = _trainer(tmp_path / "c", images, compile=True)
    for _ in range(2):
        le, lc = eager.train_step(), compiled.train_step()
        assert lc == pytest.approx(le, rel=1e-5, abs=1e-6)
    for a, b in zip(eager.model.parameters(), compiled.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_cli_train_takes_noise_and_compile(tmp_path, monkeypatch):
    """``fastddpm train --noise philox`` is a setting of the run (kept on resume); ``--compile`` is
    passed to the trainer each time as given."""
    import importlib
    import json

    from fastddpm.cli import main

    train_module = importlib.import_module("fastddpm.train")  # the module, not fastddpm.train()

    seen = []
    real = train_module.Trainer.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        seen.append((self.config.noise, self.config.compile))

    monkeypatch.setattr(train_module.Trainer, "__init__", spy)
    out = str(tmp_path / "run")
    assert main(["train", "--data", "digits", "--out", out, "--steps", "2", "--batch-size", "8", "--noise", "philox",
                 "--quiet"]) == 0
    with open(f"{out}/checkpoint/config.json") as f:
        assert json.load(f)["train"]["noise"] == "philox"
    assert main(["train", "--data", "digits", "--out", out, "--steps", "3", "--resume", "--compile", "--quiet"]) == 0
    with open(f"{out}/checkpoint/config.json") as f:
        assert "compile" not in json.load(f)["train"]  # a speed option is not saved with the run
    assert main(["train", "--data", "digits", "--out", out, "--steps", "4", "--resume", "--quiet"]) == 0
    assert seen == [("philox", False), ("philox", True), ("philox", False)]
    assert main(["train", "--data", "digits", "--out", out, "--noise", "randn"]) == 2


def test_the_trainers_philox_shares_make_the_global_draw(tmp_path):
    """Trainer._draws under noise='philox' as rank r of N (set by hand: one process here): the noise
    each rank's kernel draws is its rows of the one-process draw of that step."""
    images = load_digits_data()[0][:64]
    trainer = _trainer(tmp_path, images, noise="philox")
    bs, x0 = trainer.config.batch_size, images[:1]
    whole = PhiloxState(_step_seed(trainer.config.seed, trainer.step), base=0).randn((bs, *x0.shape[1:]))
    for world in (2, 4):
        shares = []
        for rank in range(world):
            trainer.rank, trainer.world_size = rank, world
            t, noise, state = trainer._draws(torch.Generator().manual_seed(0), x0)
            assert noise is None
            rows = bs // world
            assert t.shape == (rows,)
            _, eps = ops.q_sample(torch.zeros(rows, *x0.shape[1:]), torch.zeros(rows, dtype=torch.int64),
                                  torch.tensor([[0.0, 1.0]]), rng=state)
            shares.append(eps)
        assert torch.equal(torch.cat(shares), whole)
