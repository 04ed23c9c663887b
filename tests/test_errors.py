"""Bad input to the public entry points: a ValueError/TypeError that names the argument, never a
traceback from deep inside; and the ``fastddpm`` command: one line on stderr, exit status 2, with
output paths checked before any work. (Checkpoints: test_checkpoint_safety.py; training:
test_train_safety.py; the ops: test_ops_errors.py.)"""

import os
import warnings

import pytest
import torch

import fastddpm
from fastddpm import UNet, UNetConfig, save
from fastddpm.cli import main
from fastddpm.sampling import NonFiniteWarning

TINY = UNetConfig(resolution=8, in_channels=1, out_channels=1, ch=8, ch_mult=(1,), num_res_blocks=1,
                  attn_resolutions=(), groups=4, dropout=0.0)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return UNet(TINY).eval()


def identity(x, t):
    return x


# ------------------------------------------------------------------------------- sample()
SAMPLE_CASES = [
    # (keyword arguments, exception class, text the message must contain)
    (dict(sampler="ddpm", eta=0.5), ValueError, "eta"),
    (dict(sampler="ddim", eta=1.5), ValueError, "eta"),
    (dict(seed="abc"), ValueError, "seed"),
    (dict(seed=2 ** 70), ValueError, "seed"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(generator=5), TypeError, "generator"),
    (dict(seed=1, generator=torch.Generator()), ValueError, "seed / generator"),
    (dict(device="meta"), ValueError, "device"),
    (dict(device="tpu"), ValueError, "device"),
    (dict(n=0), ValueError, "n"),
    (dict(n="2"), ValueError, "n"),
    (dict(steps=0), ValueError, "steps"),
    (dict(steps=5000), ValueError, "steps"),
    (dict(batch_size=True), ValueError, "batch_size"),
    (dict(sampler="dpm"), ValueError, "sampler"),
    (dict(variance="learned"), ValueError, "variance"),
    (dict(clip=-1.0), ValueError, "clip"),
    (dict(noise_source="numpy"), ValueError, "noise_source"),
    (dict(dtype="int8"), ValueError, "dtype"),
    (dict(channels_last="yes"), TypeError, "channels_last"),
    (dict(fast=True), TypeError, "fast"),
]


@pytest.mark.parametrize("kwargs,error,name", SAMPLE_CASES, ids=[str(c[0])[:40] for c in SAMPLE_CASES])
def test_sample_rejects_bad_arguments_by_name(tiny, kwargs, error, name):
    kwargs = dict(dict(n=2, steps=2, progress=False, reuse=False), **kwargs)
    with pytest.raises(error, match=rf"^{name}\b"):
        fastddpm.sample(tiny, **kwargs)


@pytest.mark.parametrize("shape,error", [("abc", TypeError), ((1, -2, 4), ValueError), ((1, 4), ValueError),
                                         ((1.0, 4, 4), TypeError), (None, ValueError)])
def test_sample_checks_shape_of_a_plain_callable(shape, error):
    with pytest.raises(error, match=r"^shape\b"):
        fastddpm.sample(identity, 2, steps=2, shape=shape, progress=False, reuse=False)


@pytest.mark.parametrize("returns", [lambda x: (x,), lambda x: None, lambda x: x[:, :, :2], lambda x: x.numpy()])
def test_sample_names_the_model_when_it_returns_the_wrong_thing(returns):
    with pytest.raises((ValueError, TypeError), match=r"^model\b"):
        fastddpm.sample(lambda x, t: returns(x), 2, steps=2, shape=(1, 4, 4), progress=False, reuse=False)


@pytest.mark.parametrize("value", [5, None, [1]])
def test_sample_rejects_what_is_not_a_model(value):
    with pytest.raises(TypeError, match=r"^model_or_path\b"):
        fastddpm.sample(value, 2, steps=2, progress=False)


def test_nonfinite_samples_warn_once_naming_the_cause():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = fastddpm.sample(lambda x, t: x * float("nan"), 3, steps=4, shape=(1, 4, 4), progress=False,
                            reuse=False)
    nonfinite = [w for w in caught if issubclass(w.category, NonFiniteWarning)]
    assert len(nonfinite) == 1 and x.isnan().all()
    assert "3 of 3 images" in str(nonfinite[0].message) and "model returned NaN" in str(nonfinite[0].message)


def test_finite_samples_do_not_warn(tiny):
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteWarning)
        assert torch.isfinite(fastddpm.sample(tiny, 2, steps=3, seed=0, progress=False, reuse=False)).all()


# ------------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny):
    return save(tiny, str(tmp_path_factory.mktemp("ck") / "tiny"))


def run_cli(argv, capsys):
    """(exit status, stderr lines) of ``fastddpm argv``, argparse's own exits included."""
    try:
        status = main(argv)
    except SystemExit as e:
        status = e.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return status, err


def user_error_cases(tmp, checkpoint):
    """(argv, text the one error line must contain) for user errors of every subcommand."""
    a_file = tmp / "a_file"
    a_file.write_text("x")
    fake_png_dir = tmp / "fake_pngs"
    fake_png_dir.mkdir(exist_ok=True)
    (fake_png_dir / "x.png").write_text("not an image")
    quick = ["--model", checkpoint, "--steps", "2", "--quiet"]
    return [
        (["sample", *quick, "--out", str(tmp)], "--out"),
        (["sample", *quick, "--out", str(tmp / "samples.txt")], "--out"),
        (["sample", *quick, "--out", str(a_file / "x.png")], "--out"),
        (["sample", *quick, "--out", "/proc/no/such/x.png"], "--out"),
        (["sample", *quick, "--out", str(tmp / "s.png"), "--npy", str(a_file / "x.npy")], "--npy"),
        (["sample", *quick, "--out", str(tmp / "s.png"), "--npy", str(tmp / "x.txt")], "--npy"),
        (["sample", *quick, "--threads", "-1"], "--threads"),
        (["sample", *quick, "--scale", "0"], "--scale"),
        (["sample", *quick, "--n", "abc"], "--n"),
        (["sample", *quick, "--n", "0"], "--n"),
        (["sample", *quick, "--seed", "-3"], "--seed"),
        (["sample", *quick, "--eta", "0.5", "--out", str(tmp / "s.png")], "eta"),
        (["sample", "--model", str(tmp / "missing"), "--out", str(tmp / "s.png"), "--quiet"], "does not exist"),
        (["sample", *quick, "--device", "cuda:7", "--out", str(tmp / "s.png")], "device"),
        (["sample", *quick, "--graph-steps", "0"], "--graph-steps"),
        (["train", "--out", str(a_file), "--steps", "1", "--quiet"], "--out"),
        (["train", "--out", str(tmp / "run"), "--steps", "0", "--quiet"], "--steps"),
        (["train", "--out", str(tmp / "run"), "--steps", "1", "--batch-size", "0", "--quiet"], "--batch-size"),
        (["train", "--out", str(tmp / "run"), "--steps", "1", "--data", str(tmp / "nothing.npy"), "--quiet"], "data"),
        (["train", "--out", str(tmp / "run"), "--steps", "1", "--data", str(fake_png_dir), "--quiet"], "data"),
        (["edit", "reconstruct", "--model", checkpoint, "--out", str(tmp)], "--out"),
        (["edit", "inpaint", "--model", checkpoint, "--jump", "0"], "--jump"),
        (["edit", "reconstruct", "--model", checkpoint, "--input", str(tmp / "none.png"),
          "--out", str(tmp / "e.png")], "input"),
        (["bpd", "--model", checkpoint, "--n", "0"], "--n"),
        (["sampel"], "invalid choice"),
    ]


def test_every_user_error_is_one_line_with_exit_status_2(tmp_path, capsys, checkpoint):
    for argv, text in user_error_cases(tmp_path, checkpoint):
        status, err = run_cli(argv, capsys)
        assert status == 2, (argv, status, err)
        assert len(err) == 1 and "error" in err[0] and text in err[0], (argv, err)
        assert "Traceback" not in err[0]
    assert not (tmp_path / "s.png").exists()  # nothing was written by a run that failed its checks


def test_output_paths_are_checked_before_sampling(tmp_path, capsys, checkpoint, monkeypatch):
    """A bad --npy fails before the model runs (a 1000-step run would otherwise come first)."""
    calls = []
    monkeypatch.setattr(fastddpm.sampling, "sample", lambda *a, **k: calls.append(1))
    status, err = run_cli(["sample", "--model", checkpoint, "--out", str(tmp_path / "s.png"),
                           "--npy", str(tmp_path / "a" / "b.txt"), "--quiet"], capsys)
    assert status == 2 and not calls and "--npy" in err[0]


def test_nonfinite_samples_are_an_error_of_the_command(tmp_path, capsys):
    broken = UNet(TINY)
    with torch.no_grad():
        for p in broken.parameters():
            p.fill_(float("nan"))
    ck = save(broken, str(tmp_path / "nan"))
    status, err = run_cli(["sample", "--model", ck, "--steps", "2", "--n", "2", "--quiet",
                           "--out", str(tmp_path / "s.png")], capsys)
    assert status == 2 and len(err) == 1 and "NaN" in err[0]
    assert not (tmp_path / "s.png").exists()


def test_debug_shows_the_traceback(tmp_path, checkpoint):
    with pytest.raises(ValueError, match="eta"):
        main(["--debug", "sample", "--model", checkpoint, "--steps", "2", "--eta", "0.5", "--quiet",
              "--out", str(tmp_path / "s.png")])


def test_a_bug_keeps_its_traceback(tmp_path, checkpoint, monkeypatch):
    """Only user errors become one line: an unexpected exception (a bug) propagates."""
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(fastddpm.sampling, "sample", broken)
    with pytest.raises(ZeroDivisionError):
        main(["sample", "--model", checkpoint, "--quiet", "--out", str(tmp_path / "s.png")])


def test_save_grid_checks_scale_and_file_name(tmp_path):
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="^scale"):
        fastddpm.save_grid(x, str(tmp_path / "g.png"), scale=0)
    with pytest.raises(ValueError, match="^path"):
        fastddpm.save_grid(x, str(tmp_path))
    assert os.path.exists(fastddpm.save_grid(x, str(tmp_path / "g.png")))


def test_sample_from_a_checkpoint_whose_config_is_a_symlink_loop(tmp_path):
    """The sampler's model cache reads file stats first: a loop there must still end in
    CheckpointError from load, not an OSError from the cache."""
    folder = tmp_path / "ck"
    folder.mkdir()
    os.symlink(folder / "config.json", folder / "config.json")
    with pytest.raises(fastddpm.CheckpointError, match="config.json"):
        fastddpm.sample(str(folder), 2, steps=2, progress=False)
