"""Checkpoints: a directory of safetensors weights plus a JSON config, written atomically.

Layout::

    config.json          format/version, model + schedule config, prediction, step, sha256 of files
    model.safetensors    the trained weights
    ema.safetensors      the EMA weights (optional)
    optimizer.pt         optimizer / scaler / RNG state for ``resume`` (optional)

A checkpoint is written into a temporary sibling directory and then swapped into place, so an
interrupted save never damages the previous checkpoint. Loading verifies every file's hash and
reports a broken or partial checkpoint instead of half-loading it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
from safetensors.torch import load_file, save_file

FORMAT = "fastddpm-checkpoint"
VERSION = 1
CONFIG = "config.json"


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


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def write_checkpoint(path: str, config: Dict[str, Any], model, *, ema=None,
                     optimizer: Optional[Dict[str, Any]] = None,
                     weights_dtype: Optional[torch.dtype] = None) -> str:
    """Write a checkpoint directory at ``path`` atomically; returns ``path``.

    ``model`` and ``ema`` are modules or state dicts; ``weights_dtype`` (e.g. float16) converts
    floating-point weights for a smaller file (they are cast back to the model's dtype on load).
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    try:
        files = {}
        for name, obj in (("model.safetensors", model), ("ema.safetensors", ema)):
            if obj is None:
                continue
            state = _state(obj)
            if weights_dtype is not None:
                state = {k: v.to(weights_dtype) if v.is_floating_point() else v for k, v in state.items()}
            save_file(state, os.path.join(tmp, name))
            files[name] = _sha256(os.path.join(tmp, name))
        if optimizer is not None:
            torch.save(optimizer, os.path.join(tmp, "optimizer.pt"))
            files["optimizer.pt"] = _sha256(os.path.join(tmp, "optimizer.pt"))
        full = dict(config, format=FORMAT, version=VERSION, files=files)
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(full, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _make_readable(tmp)
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=os.path.basename(path) + ".old-", dir=parent)
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_config(path: str) -> Dict[str, Any]:
    """Read and validate ``config.json`` of the checkpoint at ``path``."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint: {path!r} does not exist")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint: {path!r} is not a checkpoint directory "
                              f"(expected a folder holding {CONFIG} and model.safetensors)")
    cfg_path = os.path.join(path, CONFIG)
    try:
        with open(cfg_path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint: {path!r} has no {CONFIG}; not a fastddpm checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint: {cfg_path!r} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint: {cfg_path!r} is not a fastddpm checkpoint config")
    if config.get("version") != VERSION:
        raise CheckpointError(f"checkpoint: {path!r} has format version {config.get('version')!r}, "
                              f"this fastddpm reads version {VERSION}")
    return config


def read_checkpoint(path: str, *, with_optimizer: bool = False) -> Checkpoint:
    """Load a checkpoint directory, verifying every file against the hashes in its config."""
    config = read_config(path)
    files = config.get("files", {})
    if "model.safetensors" not in files:
        raise CheckpointError(f"checkpoint: {path!r} lists no model.safetensors")
    for name, digest in files.items():
        fp = os.path.join(path, name)
        if not os.path.isfile(fp):
            raise CheckpointError(f"checkpoint: {fp!r} is missing")
        if (name != "optimizer.pt" or with_optimizer) and _sha256(fp) != digest:
            raise CheckpointError(f"checkpoint: {fp!r} is corrupt (sha256 does not match {CONFIG})")
    try:
        model = load_file(os.path.join(path, "model.safetensors"))
        ema = load_file(os.path.join(path, "ema.safetensors")) if "ema.safetensors" in files else None
        optimizer = None
        if with_optimizer and "optimizer.pt" in files:
            optimizer = torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu",
                                   weights_only=True)
    except Exception as e:  # a file that matched its hash but still fails to parse
        raise CheckpointError(f"checkpoint: {path!r} could not be read ({e})") from e
    return Checkpoint(config=config, model=model, ema=ema, optimizer=optimizer, path=path)
