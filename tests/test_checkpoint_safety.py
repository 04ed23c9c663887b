"""Checkpoints are never lost (the swap, recovery, leftovers; SIGKILLed writers) and a crafted
checkpoint is refused before anything sized by it is allocated or read (issue 16, items 1 and 3).

Killed writers run in processes forked from a forkserver that has imported fastddpm once: a fresh
interpreter per kill would spend seconds importing torch each time.
"""

import errno
import json
import multiprocessing
import os
import random
import signal
import struct
import subprocess
import time
import warnings

import pytest
import torch

import fastddpm
from fastddpm import DDPM, PRESETS, CheckpointError, Schedule, ScheduleConfig, UNet, UNetConfig, load, save
from fastddpm import checkpoint
from fastddpm.checkpoint import read_checkpoint, recover_checkpoint, remove_abandoned_temporaries
# Patches go where a name is looked up: save_file / load_file in fastddpm.checkpoint (the save and
# load orchestration), _exchange / _HOST in its swap module.
from fastddpm.checkpoint import swap, validate

TINY = UNetConfig(resolution=8, in_channels=1, out_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                  attn_resolutions=(), dropout=0.0, groups=4)
FAST = 1.0  # seconds: a crafted checkpoint is refused well within this


def _save(path, step, ema=True):
    torch.manual_seed(step)
    model = UNet(TINY)
    return save(DDPM(model, Schedule.linear(T=10), step=step), str(path), ema=model if ema else None)


def _siblings(path):
    """The temporary folders beside the checkpoint ``path``."""
    name = os.path.basename(path)
    return sorted(e for e in os.listdir(os.path.dirname(path)) if e.startswith(name + "."))


def _dead_pid():
    """A pid of this host that no process has now (a child that has exited and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _assert_intact(path, step):
    """The checkpoint of ``step`` is at ``path`` itself (not recovered from beside it), alone."""
    assert os.path.isfile(os.path.join(path, "config.json")) and _siblings(path) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a recovery would warn
        assert load(path).step == step


# ------------------------------------------------------------------------------------ the swap
def test_the_swap_is_one_atomic_exchange_where_the_system_offers_it(tmp_path, monkeypatch):
    path = _save(tmp_path / "ck", 1)
    calls = []
    real = swap._exchange
    monkeypatch.setattr(swap, "_exchange", lambda a, b: calls.append(real(a, b)) or calls[-1])
    _save(path, 2)
    if not calls[0]:
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here; the fallback is tested below")
    assert load(path).step == 2 and _siblings(path) == []


def test_a_failed_exchange_keeps_the_previous_checkpoint_and_raises(tmp_path, monkeypatch):
    path = _save(tmp_path / "ck", 1)

    def no_space(a, b):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(swap, "_exchange", no_space)
    with pytest.raises(OSError, match="No space left"):
        _save(path, 2)
    _assert_intact(path, 1)


def test_the_fallback_swap_replaces_the_checkpoint_with_two_renames(tmp_path, monkeypatch):
    path = _save(tmp_path / "ck", 1)
    monkeypatch.setattr(swap, "_exchange", lambda a, b: False)
    renames = []
    real = os.rename
    monkeypatch.setattr(os, "rename", lambda a, b: renames.append((a, b)) or real(a, b))
    _save(path, 2)
    assert [os.path.basename(b) for _, b in renames][1] == "ck" and len(renames) == 2
    assert ".old-" in os.path.basename(renames[0][1])
    assert load(path).step == 2 and _siblings(path) == []


def test_a_failed_second_rename_puts_the_previous_checkpoint_back(tmp_path, monkeypatch):
    path = _save(tmp_path / "ck", 1)
    monkeypatch.setattr(swap, "_exchange", lambda a, b: False)
    real = os.rename

    def rename(a, b):
        if ".tmp-" in os.path.basename(a) and b == path:  # the new checkpoint moving in
            raise OSError(errno.ENOSPC, "No space left on device")
        real(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="No space left"):
        _save(path, 2)
    monkeypatch.undo()
    _assert_intact(path, 1)


def test_files_and_folders_are_fsynced(tmp_path, monkeypatch):
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name the fsynced descriptors")
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    path = _save(tmp_path / "ck", 1)
    names = [os.path.basename(p) for p in synced]
    assert {"model.safetensors", "ema.safetensors", "config.json"} <= set(names)
    assert any(".tmp-" in n for n in names), names  # the new folder's entries
    assert os.path.realpath(tmp_path) in synced  # the rename into the parent


# --------------------------------------------------------------------------- killed writers
def _kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def _die_between_the_fallback_renames():
    swap._exchange = lambda a, b: False
    real = os.rename
    os.rename = lambda a, b: _kill_self() if ".tmp-" in os.path.basename(a) else real(a, b)


def _write_and_die(path, moment):
    """Child: save step 2 over ``path`` and be SIGKILLed at ``moment`` of the save."""
    if moment == "between the fallback renames":
        _die_between_the_fallback_renames()
    elif moment == "after the exchange":
        real = swap._exchange
        swap._exchange = lambda a, b: real(a, b) and _kill_self()
    else:  # while writing the files
        checkpoint.save_file = lambda *args, **kwargs: _kill_self()
    _save(path, 2)


def _resume_and_die(out, images):
    """Child: resume the run in ``out`` for one more step; its save is killed mid-swap."""
    _die_between_the_fallback_renames()
    trainer = fastddpm.Trainer.resume(out, images)
    trainer.train(trainer.step + 1, progress=False)


def _exchange_works(folder):
    a, b = os.path.join(folder, "probe-a"), os.path.join(folder, "probe-b")
    os.mkdir(a)
    os.mkdir(b)
    return swap._exchange(a, b)


@pytest.fixture(scope="module")
def forked():
    """A multiprocessing context whose processes fork from a server that has imported fastddpm."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs the forkserver start method")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["fastddpm", __name__])
    return ctx


def _run_killed(ctx, target, *args):
    proc = ctx.Process(target=target, args=args)
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL
    return proc.pid


@pytest.mark.parametrize("moment, step", [("between the fallback renames", 2), ("after the exchange", 2),
                                          ("while writing the files", 1)])
def test_a_save_killed_at_any_moment_leaves_a_loadable_checkpoint(tmp_path, forked, moment, step):
    if moment == "after the exchange" and not _exchange_works(tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    path = _save(tmp_path / "ck", 1)
    pid = _run_killed(forked, _write_and_die, path, moment)
    left = _siblings(path)
    assert left and all(f"-{pid}-" in e for e in left)  # the killed writer's folders
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load(path).step == step
    # only the mid-swap kill leaves the path empty, and only then is something recovered
    assert bool(caught) == (moment == "between the fallback renames")
    assert os.path.isfile(os.path.join(path, "config.json"))
    _save(path, 3)  # the next write removes the dead writer's leftovers
    assert _siblings(path) == [] and load(path).step == 3


def test_resume_recovers_a_checkpoint_whose_swap_was_killed(tmp_path, forked):
    out, images = str(tmp_path / "run"), torch.rand(8, 1, 8, 8) * 2 - 1
    fastddpm.train(images, out=out, steps=2, model_config=TINY, schedule=ScheduleConfig(T=10),
                   progress=False, batch_size=4, warmup=0)
    _run_killed(forked, _resume_and_die, out, images)
    assert not os.path.exists(os.path.join(out, "checkpoint"))
    with pytest.warns(RuntimeWarning, match="step 3 .*moved into place"):
        trainer = fastddpm.Trainer.resume(out, images)
    assert trainer.step == 3 and os.path.isdir(os.path.join(out, "checkpoint"))


def test_load_of_a_run_directory_recovers_its_checkpoint(tmp_path, forked):
    path = _save(tmp_path / "checkpoint", 1)
    _run_killed(forked, _write_and_die, path, "between the fallback renames")
    with pytest.warns(RuntimeWarning, match="interrupted"):
        assert load(str(tmp_path)).step == 2


def test_a_save_after_a_killed_swap_first_puts_the_checkpoint_back(tmp_path, forked, monkeypatch):
    path = _save(tmp_path / "ck", 1)
    _run_killed(forked, _write_and_die, path, "between the fallback renames")

    def no_space(a, b):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(swap, "_exchange", no_space)
    with pytest.warns(RuntimeWarning, match="step 2"), pytest.raises(OSError, match="No space left"):
        _save(path, 3)  # fails, but only after the recovered checkpoint is back in place
    monkeypatch.undo()
    assert load(path).step == 2 and _siblings(path) == []


def _train_until_killed(out, resume, fallback):
    """Child: train a tiny model forever, checkpointing every step."""
    if fallback:
        swap._exchange = lambda a, b: False
    torch.set_num_threads(1)
    images = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    settings = {} if resume else dict(batch_size=4, warmup=0, checkpoint_every=1, log_every=0)
    fastddpm.train(images, out=out, steps=10 ** 6, model_config=TINY, schedule=ScheduleConfig(T=10),
                   resume=resume, progress=False, **settings)


def _step_at(path):
    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f)["step"]
    except (OSError, ValueError):
        return -1


def test_twenty_random_sigkills_of_a_training_run_never_lose_the_checkpoint(tmp_path, forked):
    """Kills alternate between a run that swaps with the exchange and one that uses the fallback."""
    out, rng = str(tmp_path / "run"), random.Random(0)
    path = os.path.join(out, "checkpoint")
    exchange_works = _exchange_works(tmp_path)
    last = -1
    for i in range(20):
        fallback = i % 2 == 1
        proc = forked.Process(target=_train_until_killed, args=(out, i > 0, fallback))
        proc.start()
        deadline = time.monotonic() + 60
        while _step_at(path) <= last and time.monotonic() < deadline and proc.is_alive():
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.2))  # a step and a save take about 0.15 s here
        proc.kill()
        proc.join()
        assert proc.exitcode == -signal.SIGKILL, f"kill {i}: the child ended on its own"
        exchange = exchange_works and not fallback
        if exchange:  # nothing to recover: the path always holds a checkpoint
            assert os.path.isfile(os.path.join(path, "config.json")), f"kill {i}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the fallback's recovery
            step = read_checkpoint(path, with_optimizer=True).config["step"]
        assert step > last, f"kill {i}: step {step} after {last}"
        last = step
        # the child's first save removed the earlier children's leftovers: only its own remain
        left = _siblings(path)
        assert all(f"-{proc.pid}-" in e for e in left), (i, left)
        assert len(left) <= (1 if exchange else 2), (i, left)
    remove_abandoned_temporaries(path)
    assert _siblings(path) == []


# ---------------------------------------------------------------------------- leftovers
def test_only_dead_writers_leftovers_of_this_host_are_removed(tmp_path):
    path = _save(tmp_path / "ck", 1)
    host = swap._HOST
    live = f"ck.tmp-{host}-{os.getppid()}-aaaaaaaa"
    dead = f"ck.old-{host}-{_dead_pid()}-bbbbbbbb"
    foreign = f"ck.tmp-{host}x-{_dead_pid()}-cccccccc"
    legacy, other = "ck.tmp-k2j3h4_a", "ckpt.tmp-x"
    for name in (live, dead, foreign, legacy, other):
        os.mkdir(tmp_path / name)
    _save(path, 2)
    assert sorted(os.listdir(tmp_path)) == sorted(["ck", live, foreign, legacy, other])


def test_recovery_takes_the_newest_complete_sibling(tmp_path):
    host = swap._HOST
    for step, suffix in ((3, "a"), (5, "b"), (9, "c")):
        os.rename(_save(tmp_path / "x", step), tmp_path / f"ck.old-{host}-{_dead_pid()}-{suffix}")
    newest_broken = next(tmp_path.glob("ck.old-*-c")) / "model.safetensors"
    newest_broken.write_bytes(newest_broken.read_bytes()[:-4])  # truncated: not complete
    path = str(tmp_path / "ck")
    with pytest.warns(RuntimeWarning, match="step 5"):
        assert recover_checkpoint(path) == path
    assert load(path).step == 5


def test_a_running_writers_complete_temporary_is_not_recovered(tmp_path):
    os.rename(_save(tmp_path / "x", 4), tmp_path / f"ck.tmp-{swap._HOST}-{os.getppid()}-a")
    assert recover_checkpoint(str(tmp_path / "ck")) is None
    with pytest.raises(CheckpointError, match="does not exist"):
        load(str(tmp_path / "ck"))


# ---------------------------------------------------------------------- crafted checkpoints
def _refused(path, match, monkeypatch):
    """Load ``path``: a CheckpointError matching ``match`` within FAST seconds, with no tensor data
    read and no model built."""
    def fail(*args, **kwargs):
        raise AssertionError("built a model or read tensors for a checkpoint that should be refused")

    monkeypatch.setattr(checkpoint, "load_file", fail)
    monkeypatch.setattr(fastddpm.pipeline, "build_ddpm", fail)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=match):
        load(str(path))
    assert time.perf_counter() - start < FAST
    monkeypatch.undo()


def _edit_config(path, edit):
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        config = json.load(f)
    edit(config)
    with open(cfg_path, "w") as f:
        json.dump(config, f)


@pytest.mark.parametrize("changes, match", [
    (dict(ch=4096), "ch: expected a positive int of at most 1024, got 4096"),
    (dict(num_res_blocks=10 ** 6), "num_res_blocks: expected a positive int of at most 64"),
    (dict(ch=1024, ch_mult=[16] * 8, resolution=256, groups=8), "ch / ch_mult / num_res_blocks: .* parameters"),
    (dict(ch_mult="1234"), "ch_mult: expected a sequence"),
    (dict(dropout="high"), "dropout: expected a float"),
])
def test_a_huge_or_malformed_model_config_is_refused_before_a_model_is_built(tmp_path, monkeypatch, changes,
                                                                             match):
    path = _save(tmp_path / "ck", 1)
    _edit_config(path, lambda c: c["model"].update(changes))
    monkeypatch.setattr(UNet, "__init__", lambda *a, **k: pytest.fail("built a U-Net for a refused config"))
    _refused(path, match, monkeypatch)  # not even on the meta device


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(files={"../x": "0" * 64, **c["files"]}), r"files: '\.\./x' is not a checkpoint file"),
    (lambda c: c.update(files={"/etc/passwd": "0" * 64, **c["files"]}), "files: '/etc/passwd' is not a checkpoint"),
    (lambda c: c.update(files="model.safetensors"), "files: expected an object .* got str"),
    (lambda c: c["files"].update({"ema.safetensors": "abc"}), "files: 'ema.safetensors': expected a sha256"),
    (lambda c: c.update(step="abc"), "step: expected a non-negative int, got 'abc'"),
    (lambda c: c.update(step=-1), "step: expected a non-negative int, got -1"),
    (lambda c: c.update(prediction="noise"), "prediction: expected one of"),
    (lambda c: c["schedule"].update(T=10 ** 9), "T: expected an int in"),
    (lambda c: c.update(model=[1]), "model: expected an object, got list"),
])
def test_a_malformed_config_is_refused_naming_the_field(tmp_path, monkeypatch, edit, match):
    path = _save(tmp_path / "ck", 1)
    _edit_config(path, edit)
    _refused(path, match, monkeypatch)


def test_config_json_a_directory_a_symlink_loop_or_too_large_is_refused(tmp_path, monkeypatch):
    path = _save(tmp_path / "ck", 1)
    cfg = os.path.join(path, "config.json")
    os.remove(cfg)
    os.mkdir(cfg)
    _refused(path, "config.json' is not a regular file", monkeypatch)
    os.rmdir(cfg)
    os.symlink("config.json", cfg)  # points at itself
    _refused(path, "config.json' is a symbolic link loop", monkeypatch)
    os.remove(cfg)
    with open(cfg, "w") as f:
        json.dump({"format": "fastddpm-checkpoint", "pad": "x" * (10 << 20)}, f)
    _refused(path, "larger than the 1048576 bytes", monkeypatch)
    with open(cfg, "w") as f:
        f.write("[" * 100000 + "]" * 100000)
    _refused(path, "not valid JSON", monkeypatch)


def test_a_weights_file_outside_the_checkpoint_is_never_opened(tmp_path, monkeypatch):
    path = _save(tmp_path / "ck", 1)
    outside = tmp_path / "elsewhere.safetensors"
    os.rename(os.path.join(path, "model.safetensors"), outside)
    os.symlink(outside, os.path.join(path, "model.safetensors"))
    _refused(path, "resolves to .*, outside the checkpoint folder", monkeypatch)


def _rewrite_safetensors(path, edit, length=None):
    """Edit the header of ``path``'s model.safetensors and record the new hash in config.json, so
    that only the header check can catch it."""
    fp = os.path.join(path, "model.safetensors")
    data = open(fp, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    with open(fp, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if length is None else length) + raw + data[8 + n:])
    _edit_config(path, lambda c: c["files"].update({"model.safetensors": validate._sha256(fp)}))


def _rename_tensor(header):
    header["evil"] = header.pop("conv_in.weight")


def _reshape(header):
    header["conv_in.weight"]["shape"] = [4, 4, 3, 3]


def _retype(header):
    header["conv_in.weight"]["dtype"] = "I32"


def _stretch(header):
    header["conv_in.weight"]["data_offsets"][1] += 1 << 40


@pytest.mark.parametrize("edit, length, match", [
    (_rename_tensor, None, "holds tensor 'evil', which the model config does not have"),
    (_reshape, None, r"tensor 'conv_in.weight' has shape \[4, 4, 3, 3\], the model config gives \[8, 1, 3, 3\]"),
    (_retype, None, "tensor 'conv_in.weight' has dtype 'I32', expected a floating-point dtype"),
    (_stretch, None, "tensor 'conv_in.weight' has data_offsets"),
    (lambda h: None, 1 << 40, "declares a 1099511627776-byte safetensors header, but the file has"),
])
def test_a_crafted_safetensors_header_is_refused_before_its_data_is_read(tmp_path, monkeypatch, edit,
                                                                         length, match):
    path = _save(tmp_path / "ck", 1, ema=False)
    _rewrite_safetensors(path, edit, length)
    _refused(path, match, monkeypatch)


def test_weights_stored_as_float16_still_load(tmp_path):
    torch.manual_seed(0)
    model = UNet(TINY)
    path = save(model, str(tmp_path / "ck"), weights_dtype=torch.float16)
    loaded = load(path).model
    assert loaded.conv_in.weight.dtype == torch.float32
    torch.testing.assert_close(loaded.conv_in.weight, model.conv_in.weight.half().float())


@pytest.mark.parametrize("config", [TINY, *PRESETS.values()], ids=["tiny", *PRESETS])
def test_the_parameter_bound_counts_exactly_what_the_unet_builds(config):
    with torch.device("meta"):  # the same modules, no memory
        assert config.num_parameters() == UNet(config).num_parameters()
