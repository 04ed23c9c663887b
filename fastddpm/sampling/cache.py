"""Prepared samplers, kept and reused across :func:`fastddpm.sample` calls.

Preparing a sampler (converting the model to channels_last or Winograd form, compiling or freezing
it, allocating buffers and tables) can cost seconds to a minute; a user who calls ``sample()``
again with the same model, options and shape should pay it once. Entries are keyed by the model
object, the exact coefficient table, the batch shape, clip, device and :class:`SpeedOptions`, and
checked against a fingerprint of the model's weights (each parameter and buffer's identity, storage
and in-place version counter), so a model trained or loaded further after a call is prepared anew,
never sampled stale. The cache holds ``max_entries`` samplers (least recently used dropped first);
:func:`clear_cache` empties it, and ``sample(..., reuse=False)`` bypasses it.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import Callable, Hashable, Optional, Tuple

import torch

from .options import SpeedOptions
from .sampler import Sampler

MAX_ENTRIES = 4


def weights_fingerprint(model) -> Tuple:
    """What changes when ``model``'s weights do: for each parameter and buffer of an ``nn.Module``,
    its identity, storage address and in-place version counter (optimizer steps, ``copy_`` and
    ``load_state_dict`` bump the counter; assigning new tensors changes identity or address).
    A plain callable has no weights we can see: ``()``."""
    if not isinstance(model, torch.nn.Module):
        return ()
    tensors = list(model.parameters()) + [b for b in model.buffers() if b is not None]
    return tuple((id(p), p.data_ptr(), p._version) for p in tensors)


def table_digest(table: torch.Tensor) -> str:
    """A digest of a (small) table's exact values: two respacings with equal numbers share a key."""
    return hashlib.sha1(table.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


class SamplerCache:
    """A small LRU of prepared :class:`Sampler` objects (see the module docstring)."""

    def __init__(self, max_entries: int = MAX_ENTRIES):
        self.max_entries = max_entries
        self._entries: "OrderedDict[Hashable, Tuple[Tuple, Sampler]]" = OrderedDict()
        self.hits = self.misses = 0

    def get(self, model: Callable, schedule, coeffs: torch.Tensor, shape, *, clip: Optional[float],
            device: torch.device, options: SpeedOptions) -> Sampler:
        """The prepared sampler for these arguments: reused when its model's weights are unchanged,
        else made (and kept)."""
        key = (id(model), table_digest(coeffs), table_digest(schedule.timesteps), tuple(shape), clip, str(device),
               options)
        fingerprint = weights_fingerprint(model)
        entry = self._entries.get(key)
        if entry is not None and entry[0] == fingerprint and entry[1].model_source is model:
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[1]
        self.misses += 1
        self._entries.pop(key, None)
        sampler = Sampler(model, schedule, coeffs, shape, clip=clip, device=device, options=options)
        sampler.model_source = model  # the entry holds its model, so id(model) is not reused meanwhile
        # preparing may convert the model in place (channels_last): fingerprint what it is now
        self._entries[key] = (weights_fingerprint(model), sampler)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return sampler

    def clear(self) -> None:
        """Drop every prepared sampler (and the memory and compiled graphs they hold)."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class ModelCache:
    """Checkpoints loaded by path, kept while their files are unchanged (size and modification
    time of every file in the folder), so ``sample("mnist")`` twice loads once and its prepared
    sampler is reused."""

    def __init__(self, max_entries: int = MAX_ENTRIES):
        self.max_entries = max_entries
        self._entries: "OrderedDict[Hashable, object]" = OrderedDict()

    @staticmethod
    def _signature(path: str) -> Optional[Tuple]:
        """(name, size, mtime) of every file under ``path``; None when one cannot be read (a broken
        link, a symlink loop): then the model is not cached, and loading reports what is wrong."""
        files = []
        try:
            for root, _, names in os.walk(path):
                for name in sorted(names):
                    st = os.stat(os.path.join(root, name))
                    files.append((os.path.relpath(os.path.join(root, name), path), st.st_size, st.st_mtime_ns))
        except OSError:
            return None
        return tuple(files)

    def get(self, path: str, device: torch.device, load: Callable):
        """``load(path, device)``, or the model it returned before for the same files."""
        real = os.path.realpath(path)
        key = (real, str(device))
        signature = self._signature(real) if os.path.isdir(real) else None
        entry = self._entries.get(key)
        if entry is not None and signature is not None and entry[0] == signature:
            self._entries.move_to_end(key)
            return entry[1]
        model = load(path, device)
        if signature is not None:
            self._entries[key] = (signature, model)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return model

    def clear(self) -> None:
        """Forget every loaded model."""
        self._entries.clear()


SAMPLERS = SamplerCache()
MODELS = ModelCache()


def clear_cache() -> None:
    """Drop the prepared samplers and loaded checkpoints that :func:`fastddpm.sample` keeps."""
    SAMPLERS.clear()
    MODELS.clear()
