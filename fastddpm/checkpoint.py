"""Checkpoints: a directory of safetensors weights plus a JSON config; swapped in whole, checked
before anything sized by them is allocated.

Layout::

    config.json          format/version, model + schedule config, prediction, step, sha256 of files
    model.safetensors    the trained weights
    ema.safetensors      the EMA weights (optional)
    optimizer.pt         optimizer / scaler / RNG state for ``resume`` (optional)

Writing (:func:`write_checkpoint`). The new checkpoint is written into a sibling folder
``<name>.tmp-<host>-<pid>-<random>``; each file, then the folder, is fsynced. It is then swapped in:

* where the kernel and file system offer it (Linux >= 3.15 on ext4, xfs, btrfs, tmpfs, ...), one
  ``renameat2(RENAME_EXCHANGE)`` exchanges the new folder and the old one atomically; the old one,
  now under the temporary name, is deleted;
* elsewhere, the old folder is renamed to ``<name>.old-<host>-<pid>-<random>`` and the new one to
  ``<name>``; if that second rename raises, the old folder is renamed back before the error
  propagates. The old folder is deleted last.

The parent folder is fsynced after the swap. The guarantee: once a checkpoint exists at ``path``,
every later read of ``path`` finds a complete checkpoint, the previous one or the new one and
never a mixture, whatever happens to the writer (an exception, ENOSPC, SIGKILL); the one exception
is the fallback swap killed between its two renames, which leaves ``path`` missing and both
complete checkpoints beside it, and then the first :func:`read_checkpoint` (``fastddpm.load``,
``train(resume=True)``) moves the newer complete one back (recovery, below). Writers of one path
must not run concurrently.

Leftovers. A writer killed mid-write leaves its temporary folder. Before each write, the
temporaries of the same path whose writer is this host's process that no longer runs (its pid is
in the name) are deleted; a running process's temporaries, and those of other hosts or of older
fastddpm versions, are never touched.

Recovery (:func:`recover_checkpoint`). When ``path`` has no readable ``config.json``, the newest
(by config ``step``, then modification time) complete sibling ``<name>.tmp-*`` / ``<name>.old-*``
not owned by a running writer is used, with a warning: moved to ``path`` if ``path`` is absent,
read where it lies otherwise. Complete means that it passes every check below.

Loading (:func:`read_checkpoint`) checks, in this order, before reading any tensor data:
``config.json`` is a regular file of at most :data:`MAX_CONFIG_BYTES`; ``files`` maps only the names
in :data:`FILE_NAMES` to sha256 hex digests and ``step`` is a non-negative int; the model and
schedule configs are within the bounds of :class:`UNetConfig` / :meth:`ScheduleConfig.from_dict`
(no U-Net is built to find out); every listed file resolves inside the checkpoint folder and is a
regular file; each safetensors header (bounded size) names exactly the model's tensors with
their shapes, floating-point dtypes and byte ranges that add up to the file; every hash matches.

What the hashes protect: they detect corruption and truncation, not tampering; whoever can edit
the weights can edit ``config.json`` too. Loading a crafted checkpoint still cannot run code
(safetensors hold only tensors; ``optimizer.pt`` is read with ``torch.load(weights_only=True)``)
nor make fastddpm allocate more than the config's bounded model needs.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

from .models.unet import UNet, UNetConfig
from .schedule import PREDICTIONS, ScheduleConfig

FORMAT = "fastddpm-checkpoint"
VERSION = 1
CONFIG = "config.json"
# The only files a checkpoint may list: a name from elsewhere (a path) is refused, not resolved.
FILE_NAMES = ("model.safetensors", "ema.safetensors", "optimizer.pt")
MAX_CONFIG_BYTES = 1 << 20
# safetensors' own limit on the JSON header that precedes the tensor data.
MAX_HEADER_BYTES = 100 << 20
# The dtypes a safetensors header may name, and what they hold.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
TEMP_KINDS = ("tmp", "old")


class CheckpointError(ValueError):
    """A path that is not a readable fastddpm checkpoint."""


@dataclass
class Checkpoint:
    """The contents of a checkpoint directory (state dicts on the CPU)."""

    config: Dict[str, Any]
    model: Dict[str, torch.Tensor]
    ema: Optional[Dict[str, torch.Tensor]] = None
    optimizer: Optional[Dict[str, Any]] = None
    path: Optional[str] = None
    extra_files: Dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSpec:
    """The validated model part of a checkpoint config."""

    model: UNetConfig
    schedule: ScheduleConfig
    prediction: str
    step: int


# ----------------------------------------------------------------------- temporary folders
# The host goes into temporary names so that a folder shared between machines never has one
# machine decide that another machine's writer is dead; '-' separates the name's fields.
_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "localhost"
# This process's temporaries being written now (a thread may write while another cleans up).
_IN_FLIGHT: set = set()
_IN_FLIGHT_LOCK = threading.Lock()


def _temp_prefix(name: str, kind: str) -> str:
    return f"{name}.{kind}-{_HOST}-{os.getpid()}-"


def _is_temp_of(entry: str, name: str) -> bool:
    return any(entry.startswith(f"{name}.{kind}-") for kind in TEMP_KINDS)


def _writer_of(entry: str, name: str) -> Optional[Tuple[str, int]]:
    """``(host, pid)`` encoded in the temporary ``entry`` of checkpoint ``name``; None for a name
    this version does not make (an older fastddpm's ``mkdtemp`` name)."""
    for kind in TEMP_KINDS:
        prefix = f"{name}.{kind}-"
        if entry.startswith(prefix):
            parts = entry[len(prefix):].split("-")
            if len(parts) == 3 and parts[1].isdigit() and 0 < int(parts[1]) < 2 ** 31:
                return parts[0], int(parts[1])
    return None


def _pid_running(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (a zombie does not: it writes nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's process, alive
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (not Linux): kill(pid, 0) is all there is to know
        return True


def _writer_running(temp: str, name: str) -> Optional[bool]:
    """True when a running writer owns the temporary folder ``temp``, False when its writer is
    gone, None when that cannot be known (another host's folder, an older version's name)."""
    writer = _writer_of(os.path.basename(temp), name)
    if writer is None or writer[0] != _HOST:
        return None
    if writer[1] == os.getpid():
        with _IN_FLIGHT_LOCK:
            return temp in _IN_FLIGHT
    return _pid_running(writer[1])


def _temporaries(parent: str, name: str):
    """The temporary sibling folders of checkpoint ``name`` in ``parent`` (full paths)."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    return [e.path for e in entries if _is_temp_of(e.name, name) and e.is_dir(follow_symlinks=False)]


def remove_abandoned_temporaries(path: str) -> list:
    """Delete the temporary siblings of the checkpoint ``path`` left by writers of this host that no
    longer run; returns the folders deleted. A running writer's folder is never touched."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    gone = [t for t in _temporaries(parent, name) if _writer_running(t, name) is False]
    for temp in gone:
        shutil.rmtree(temp, ignore_errors=True)
    return gone


# ------------------------------------------------------------------------------ durability
def _seal(path: str) -> str:
    """fsync the written file ``path`` and return its sha256."""
    h = hashlib.sha256()
    with open(path, "r+b") as f:  # writable: Windows refuses to fsync a read-only descriptor
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        os.fsync(f.fileno())
    return h.hexdigest()


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: str):
    """Make the entries of folder ``path`` (a rename into it) durable; a no-op where folders
    cannot be opened (Windows) or fsynced (some network file systems)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _state(module_or_state) -> Dict[str, torch.Tensor]:
    state = module_or_state.state_dict() if hasattr(module_or_state, "state_dict") else module_or_state
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _make_readable(directory: str):
    """Give the directory and its files the permissions of ordinary new files (mkdtemp uses 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for name in os.listdir(directory):
        os.chmod(os.path.join(directory, name), 0o666 & ~umask)


# ------------------------------------------------------------------------------------ swap
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
# errnos by which renameat2 says "not here" (old kernel or libc, file system without the flag)
_EXCHANGE_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV}


@functools.lru_cache(maxsize=None)
def _renameat2():
    """libc's ``renameat2`` (glibc >= 2.28), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: str, b: str) -> bool:
    """Atomically exchange the existing entries ``a`` and ``b``; False where that is unavailable."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _EXCHANGE_UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), a, None, b)


def _install(new: str, path: str) -> Optional[str]:
    """Put the complete folder ``new`` at ``path``; returns the folder that now holds the replaced
    checkpoint (for the caller to delete), or None when there was none."""
    parent, name = os.path.split(path)
    if not os.path.lexists(path):
        os.rename(new, path)
        replaced = None
    elif _exchange(new, path):
        replaced = new
    else:
        replaced = os.path.join(parent, _temp_prefix(name, "old") + secrets.token_hex(4))
        os.rename(path, replaced)
        try:
            os.rename(new, path)
        except BaseException:
            os.rename(replaced, path)  # the previous checkpoint goes back before the error propagates
            raise
    _fsync_dir(parent)
    return replaced


def _fill(folder: str, config: Dict[str, Any], model, ema, optimizer, weights_dtype):
    """Write the checkpoint files and config.json into ``folder``, each fsynced, then the folder."""
    files = {}
    for name, obj in (("model.safetensors", model), ("ema.safetensors", ema)):
        if obj is None:
            continue
        state = _state(obj)
        if weights_dtype is not None:
            state = {k: v.to(weights_dtype) if v.is_floating_point() else v for k, v in state.items()}
        save_file(state, os.path.join(folder, name))
        files[name] = _seal(os.path.join(folder, name))
    if optimizer is not None:
        torch.save(optimizer, os.path.join(folder, "optimizer.pt"))
        files["optimizer.pt"] = _seal(os.path.join(folder, "optimizer.pt"))
    full = dict(config, format=FORMAT, version=VERSION, files=files)
    with open(os.path.join(folder, CONFIG), "w") as f:
        json.dump(full, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    _make_readable(folder)
    _fsync_dir(folder)


def write_checkpoint(path: str, config: Dict[str, Any], model, *, ema=None,
                     optimizer: Optional[Dict[str, Any]] = None,
                     weights_dtype: Optional[torch.dtype] = None) -> str:
    """Write a checkpoint directory at ``path``, swapped in whole (see the module docstring for
    the guarantee); returns ``path``.

    ``model`` and ``ema`` are modules or state dicts; ``weights_dtype`` (e.g. float16) converts
    floating-point weights for a smaller file (they are cast back to the model's dtype on load).
    """
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    if not os.path.lexists(path):
        recover_checkpoint(path)  # a killed swap's checkpoint goes back first: the cleanup would delete it
    remove_abandoned_temporaries(path)
    tmp = tempfile.mkdtemp(prefix=_temp_prefix(name, "tmp"), dir=parent)
    with _IN_FLIGHT_LOCK:
        _IN_FLIGHT.add(tmp)
    try:
        _fill(tmp, config, model, ema, optimizer, weights_dtype)
        replaced = _install(tmp, path)
    except BaseException:
        # tmp holds the unfinished new checkpoint, or nothing: the previous one is at path
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        with _IN_FLIGHT_LOCK:
            _IN_FLIGHT.discard(tmp)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    return path


# ----------------------------------------------------------------------------- validation
def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _member(folder: str, name: str) -> str:
    """The real path of the file ``name`` of checkpoint ``folder``; a CheckpointError when it is
    missing, not a regular file, a symlink loop, or resolves outside ``folder``."""
    fp = os.path.join(folder, name)
    real, root = os.path.realpath(fp), os.path.realpath(folder)
    if os.path.commonpath([root, real]) != root:
        raise CheckpointError(f"checkpoint: {fp!r} resolves to {real!r}, outside the checkpoint folder")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint: {fp!r} is missing") from None
    except OSError as e:
        what = "is a symbolic link loop" if e.errno == errno.ELOOP else f"cannot be read ({e.strerror})"
        raise CheckpointError(f"checkpoint: {fp!r} {what}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"checkpoint: {fp!r} is not a regular file")
    return real


def _read_head(fp: str, n: int) -> bytes:
    with open(fp, "rb") as f:
        return f.read(n)


def _read_member(folder: str, name: str, read: Callable[[str], Any]):
    """``read(real path)`` of the file ``name`` of checkpoint ``folder`` (checked by
    :func:`_member`), an OSError while reading (permissions, I/O) as a CheckpointError."""
    real = _member(folder, name)
    try:
        return read(real)
    except OSError as e:
        raise CheckpointError(f"checkpoint: {os.path.join(folder, name)!r} cannot be read ({e.strerror})") from None


def _load_json(fp: str, data: bytes):
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # ValueError covers bad UTF-8 and over-long ints
        raise CheckpointError(f"checkpoint: {fp!r} is not valid JSON ({_short(str(e), 200)})") from None


def read_config(path: str) -> Dict[str, Any]:
    """Read ``config.json`` of the checkpoint at ``path`` (size-capped) and check its format and
    version; the rest of it is checked by :func:`verify_checkpoint`."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint: {path!r} does not exist")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint: {path!r} is not a checkpoint directory "
                              f"(expected a folder holding {CONFIG} and model.safetensors)")
    cfg_path = os.path.join(path, CONFIG)
    if not os.path.lexists(cfg_path):
        raise CheckpointError(f"checkpoint: {path!r} has no {CONFIG}; not a fastddpm checkpoint")
    data = _read_member(path, CONFIG, lambda fp: _read_head(fp, MAX_CONFIG_BYTES + 1))
    if len(data) > MAX_CONFIG_BYTES:
        raise CheckpointError(f"checkpoint: {cfg_path!r} is larger than the {MAX_CONFIG_BYTES} bytes "
                              f"a checkpoint config may have")
    config = _load_json(cfg_path, data)
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint: {cfg_path!r} is not a fastddpm checkpoint config")
    if config.get("version") != VERSION:
        raise CheckpointError(f"checkpoint: {path!r} has format version {_short(config.get('version'))}, "
                              f"this fastddpm reads version {VERSION}")
    return config


def _listed_files(config: Dict[str, Any], path: str) -> Dict[str, str]:
    """The config's ``files``: known file names (never paths) mapped to sha256 hex digests."""
    where = f"checkpoint: {path!r} has an invalid {CONFIG}: files"
    files = config.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{where}: expected an object mapping file names to sha256 digests, "
                              f"got {type(files).__name__}")
    for name, digest in files.items():
        if name not in FILE_NAMES:
            raise CheckpointError(f"{where}: {_short(name)} is not a checkpoint file name (expected "
                                  f"one of {FILE_NAMES}; paths are not allowed)")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise CheckpointError(f"{where}: {name!r}: expected a sha256 hex digest, got {_short(digest)}")
    if "model.safetensors" not in files:
        raise CheckpointError(f"checkpoint: {path!r} lists no model.safetensors")
    return files


def model_spec(config: Dict[str, Any], path: str) -> ModelSpec:
    """The model config, schedule config, prediction and step of checkpoint ``config`` (``path``
    names it in errors), each checked against its bounds; no model is built."""
    where = f"checkpoint: {path!r} has an invalid {CONFIG}"
    step = config.get("step", 0)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{where}: step: expected a non-negative int, got {_short(step)}")
    prediction = config.get("prediction", "eps")
    if prediction not in PREDICTIONS:
        raise CheckpointError(f"{where}: prediction: expected one of {PREDICTIONS}, got {_short(prediction)}")
    for key in ("model", "schedule"):
        if not isinstance(config.get(key), dict):
            raise CheckpointError(f"{where}: {key}: expected an object, got {type(config.get(key)).__name__}")
    try:
        model, schedule = UNetConfig.from_dict(config["model"]), ScheduleConfig.from_dict(config["schedule"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where} ({_short(str(e), 300)})") from None
    return ModelSpec(model, schedule, prediction, step)


def expected_tensors(model_config: UNetConfig) -> Dict[str, Tuple[torch.dtype, Tuple[int, ...]]]:
    """Name -> (dtype, shape) of every tensor of ``UNet(model_config)``'s state dict, from a model
    built on the meta device (no memory is allocated for its weights)."""
    with torch.device("meta"):
        model = UNet(model_config)
    return {k: (v.dtype, tuple(v.shape)) for k, v in model.state_dict().items()}


def _safetensors_header(fp: str) -> Tuple[Dict[str, Any], int]:
    """The JSON header of the safetensors file ``fp`` and the size of the data after it; the header
    length is checked against the file size and :data:`MAX_HEADER_BYTES` before it is read."""
    size = os.path.getsize(fp)
    with open(fp, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"checkpoint: {fp!r} is {size} bytes, too short for a safetensors file")
        n = int.from_bytes(prefix, "little")
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"checkpoint: {fp!r} declares a {n}-byte safetensors header, but the "
                                  f"file has {size - 8} bytes after the length (and the limit is "
                                  f"{MAX_HEADER_BYTES})")
        header = _load_json(fp, f.read(n))
    if not isinstance(header, dict):
        raise CheckpointError(f"checkpoint: {fp!r} has a safetensors header that is not an object")
    header.pop("__metadata__", None)
    return header, size - 8 - n


def _check_tensor_entry(fp: str, name: str, entry, expected: Tuple[torch.dtype, Tuple[int, ...]],
                        data_size: int) -> int:
    """Check one safetensors header entry against the model's tensor; returns its byte count."""
    dtype, shape = expected
    entry = entry if isinstance(entry, dict) else {}
    stored = SAFETENSORS_DTYPES.get(entry.get("dtype")) if isinstance(entry.get("dtype"), str) else None
    # weights may be stored in another float dtype (write_checkpoint's weights_dtype)
    if stored is None or not (stored == dtype or (stored.is_floating_point and dtype.is_floating_point)):
        want = "a floating-point dtype" if dtype.is_floating_point else str(dtype)
        raise CheckpointError(f"checkpoint: {fp!r} tensor {name!r} has dtype {_short(entry.get('dtype'))}, "
                              f"expected {want}")
    if entry.get("shape") != list(shape):
        raise CheckpointError(f"checkpoint: {fp!r} tensor {name!r} has shape {_short(entry.get('shape'))}, "
                              f"the model config gives {list(shape)}")
    nbytes = stored.itemsize * int(torch.Size(shape).numel())
    offsets = entry.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_size and offsets[1] - offsets[0] == nbytes):
        raise CheckpointError(f"checkpoint: {fp!r} tensor {name!r} has data_offsets {_short(offsets)}, "
                              f"expected {nbytes} bytes within the file's {data_size} data bytes")
    return nbytes


def check_safetensors(fp: str, expected: Dict[str, Tuple[torch.dtype, Tuple[int, ...]]]):
    """Check the header of the safetensors file ``fp`` against ``expected`` (name -> (dtype,
    shape)) without reading its tensor data: the same names, shapes, float-for-float dtypes, and
    byte ranges that fill the file exactly. A CheckpointError names the first tensor that differs."""
    header, data_size = _safetensors_header(fp)
    unknown, missing = sorted(set(header) - set(expected)), sorted(set(expected) - set(header))
    if unknown:
        raise CheckpointError(f"checkpoint: {fp!r} holds tensor {_short(unknown[0])}, which the model "
                              f"config does not have ({len(unknown)} such)")
    if missing:
        raise CheckpointError(f"checkpoint: {fp!r} lacks tensor {missing[0]!r} of the model config "
                              f"({len(missing)} missing)")
    total = sum(_check_tensor_entry(fp, k, header[k], expected[k], data_size) for k in sorted(header))
    if total != data_size:
        raise CheckpointError(f"checkpoint: {fp!r} has {data_size} data bytes, its tensors need {total}")


def verify_checkpoint(path: str, *, with_optimizer: bool = True) -> Dict[str, Any]:
    """Check the checkpoint at ``path`` completely without loading a tensor (the checks of the
    module docstring; ``optimizer.pt``'s hash only ``with_optimizer``); returns its config."""
    config = read_config(path)
    files = _listed_files(config, path)
    expected = expected_tensors(model_spec(config, path).model)
    for name, digest in files.items():
        if name.endswith(".safetensors"):
            _read_member(path, name, lambda fp: check_safetensors(fp, expected))
        if (name != "optimizer.pt" or with_optimizer) and _read_member(path, name, _sha256) != digest:
            raise CheckpointError(f"checkpoint: {os.path.join(path, name)!r} is corrupt "
                                  f"(sha256 does not match {CONFIG})")
    return config


# ------------------------------------------------------------------------------- recovery
def recover_checkpoint(path: str) -> Optional[str]:
    """The newest complete temporary sibling of ``path`` (left by a writer killed mid-swap) that no
    running writer owns, moved to ``path`` when ``path`` does not exist; returns the folder that
    holds it now, or None when there is none. Warns when it recovers one."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    complete = []
    for temp in _temporaries(parent, name):
        if _writer_running(temp, name):
            continue
        try:
            step = verify_checkpoint(temp).get("step", 0)
        except CheckpointError:
            continue  # unfinished, or half deleted
        complete.append((step, os.path.getmtime(os.path.join(temp, CONFIG)), temp))
    if not complete:
        return None
    step, _, best = max(complete)
    found = best
    if not os.path.lexists(path):
        try:
            os.rename(best, path)
            _fsync_dir(parent)
            found = path
        except FileNotFoundError:  # another reader moved it there first
            found = path
        except OSError:  # e.g. a read-only folder: read it where it lies
            pass
    warnings.warn(f"checkpoint: {path!r} held no readable checkpoint (a save was interrupted); "
                  f"using the complete checkpoint of step {step} from {os.path.basename(best)!r}"
                  + (" (moved into place)" if found == path else ""), RuntimeWarning, stacklevel=3)
    return found


def read_checkpoint(path: str, *, with_optimizer: bool = False) -> Checkpoint:
    """Load a checkpoint directory after :func:`verify_checkpoint`; when ``path`` holds none, the
    checkpoint a killed save left beside it (:func:`recover_checkpoint`)."""
    path = os.fspath(path)
    try:
        read_config(path)
    except CheckpointError:
        recovered = recover_checkpoint(path)
        if recovered is None:
            raise
        path = recovered
    config = verify_checkpoint(path, with_optimizer=with_optimizer)
    files = config["files"]
    try:
        model = load_file(_member(path, "model.safetensors"))
        ema = load_file(_member(path, "ema.safetensors")) if "ema.safetensors" in files else None
        optimizer = None
        if with_optimizer and "optimizer.pt" in files:
            optimizer = torch.load(_member(path, "optimizer.pt"), map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # a file that passed every check but still fails to parse
        raise CheckpointError(f"checkpoint: {path!r} could not be read ({e})") from e
    return Checkpoint(config=config, model=model, ema=ema, optimizer=optimizer, path=path)
