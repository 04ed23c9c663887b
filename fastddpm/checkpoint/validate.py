"""The load checks: a checkpoint folder is checked completely, with bounded reads, before any
tensor is loaded or anything sized by the checkpoint is allocated.

:func:`verify_checkpoint` checks, in this order, before reading any tensor data: ``config.json`` is
a regular file of at most :data:`MAX_CONFIG_BYTES`; ``files`` maps only the names in
:data:`FILE_NAMES` to sha256 hex digests and ``step`` is a non-negative int; the model and schedule
configs are within the bounds of :class:`UNetConfig` / :meth:`ScheduleConfig.from_dict` (no U-Net
is built to find out); every listed file resolves inside the checkpoint folder and is a regular
file; each safetensors header (bounded size) names exactly the model's tensors with their shapes,
floating-point dtypes and byte ranges that add up to the file; every hash matches. Every failure is
a :class:`CheckpointError` naming the field, file or tensor.

What the hashes protect: they detect corruption and truncation, not tampering; whoever can edit
the weights can edit ``config.json`` too. Loading a crafted checkpoint still cannot run code
(safetensors hold only tensors; ``optimizer.pt`` is read with ``torch.load(weights_only=True)``)
nor make fastddpm allocate more than the config's bounded model needs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple

import torch

from ..models.unet import UNet, UNetConfig
from ..schedule import PREDICTIONS, ScheduleConfig

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


class CheckpointError(ValueError):
    """A path that is not a readable fastddpm checkpoint."""


# Its public home, as before the package split: tracebacks and pickles keep naming it there.
CheckpointError.__module__ = "fastddpm.checkpoint"


@dataclass(frozen=True)
class ModelSpec:
    """The validated model part of a checkpoint config."""

    model: UNetConfig
    schedule: ScheduleConfig
    prediction: str
    step: int


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def member_file(folder: str, name: str) -> str:
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
    :func:`member_file`), an OSError while reading (permissions, I/O) as a CheckpointError."""
    real = member_file(folder, name)
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
