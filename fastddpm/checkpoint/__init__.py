"""Checkpoints: a directory of safetensors weights plus a JSON config; swapped in whole, checked
before anything sized by them is allocated.

Layout::

    config.json          format/version, model + schedule config, prediction, step, sha256 of files
    model.safetensors    the trained weights
    ema.safetensors      the EMA weights (optional)
    optimizer.pt         optimizer / scaler / RNG state for ``resume`` (optional)

This module is the public API and the save / load orchestration; each job, with its guarantee in
its module docstring, lives in its own module:

* :mod:`.swap`: writing. :func:`write_checkpoint` fills a temporary sibling folder and swaps it in
  whole: once a checkpoint exists at ``path``, every later read of ``path`` finds a complete
  checkpoint, the previous one or the new one and never a mixture, whatever happens to the writer.
  Temporaries of dead writers of this host are deleted before each write.
* :mod:`.validate`: loading. :func:`read_checkpoint` checks the config, the file names, the model
  and schedule bounds, the safetensors headers and the hashes (bounded reads; the expected tensors
  come from a U-Net on the meta device) before it reads any tensor; a failure is a
  :class:`CheckpointError`.
* :mod:`.recovery`: a path a killed save left without a readable ``config.json`` gets the newest
  complete checkpoint beside it, on the next read or write.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
from safetensors.torch import load_file, save_file

from .recovery import recover_checkpoint
from .swap import TEMP_KINDS, remove_abandoned_temporaries, replace_folder
from .validate import (CONFIG, FILE_NAMES, FORMAT, MAX_CONFIG_BYTES, MAX_HEADER_BYTES, SAFETENSORS_DTYPES,
                       VERSION, CheckpointError, ModelSpec, check_safetensors, expected_tensors, member_file,
                       model_spec, read_config, verify_checkpoint)

__all__ = [
    "CONFIG", "FILE_NAMES", "FORMAT", "MAX_CONFIG_BYTES", "MAX_HEADER_BYTES", "SAFETENSORS_DTYPES", "TEMP_KINDS",
    "VERSION", "Checkpoint", "CheckpointError", "ModelSpec", "check_safetensors", "expected_tensors",
    "model_spec", "read_checkpoint", "read_config", "recover_checkpoint", "remove_abandoned_temporaries",
    "verify_checkpoint", "write_checkpoint",
]


@dataclass
class Checkpoint:
    """The contents of a checkpoint directory (state dicts on the CPU)."""

    config: Dict[str, Any]
    model: Dict[str, torch.Tensor]
    ema: Optional[Dict[str, torch.Tensor]] = None
    optimizer: Optional[Dict[str, Any]] = None
    path: Optional[str] = None
    extra_files: Dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------- writing
def _seal(path: str) -> str:
    """fsync the written file ``path`` and return its sha256."""
    h = hashlib.sha256()
    with open(path, "r+b") as f:  # writable: Windows refuses to fsync a read-only descriptor
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        os.fsync(f.fileno())
    return h.hexdigest()


def _state(module_or_state) -> Dict[str, torch.Tensor]:
    state = module_or_state.state_dict() if hasattr(module_or_state, "state_dict") else module_or_state
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _fill(folder: str, config: Dict[str, Any], model, ema, optimizer, weights_dtype):
    """Write the checkpoint files and config.json into ``folder``, each fsynced."""
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


def write_checkpoint(path: str, config: Dict[str, Any], model, *, ema=None,
                     optimizer: Optional[Dict[str, Any]] = None,
                     weights_dtype: Optional[torch.dtype] = None) -> str:
    """Write a checkpoint directory at ``path``, swapped in whole (see :mod:`.swap` for the
    guarantee); returns ``path``.

    ``model`` and ``ema`` are modules or state dicts; ``weights_dtype`` (e.g. float16) converts
    floating-point weights for a smaller file (they are cast back to the model's dtype on load).
    """
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.lexists(path):
        recover_checkpoint(path)  # a killed swap's checkpoint goes back first: the cleanup would delete it
    remove_abandoned_temporaries(path)
    replace_folder(path, lambda folder: _fill(folder, config, model, ema, optimizer, weights_dtype))
    return path


# --------------------------------------------------------------------------------- loading
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
        model = load_file(member_file(path, "model.safetensors"))
        ema = load_file(member_file(path, "ema.safetensors")) if "ema.safetensors" in files else None
        optimizer = None
        if with_optimizer and "optimizer.pt" in files:
            optimizer = torch.load(member_file(path, "optimizer.pt"), map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # a file that passed every check but still fails to parse
        raise CheckpointError(f"checkpoint: {path!r} could not be read ({e})") from e
    return Checkpoint(config=config, model=model, ema=ema, optimizer=optimizer, path=path)
