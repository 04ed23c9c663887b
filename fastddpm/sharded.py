"""``fastddpm sample --out-dir DIR``: many images, written as files named by image index, by one
process or by every rank of a ``torchrun`` job, resumable.

The run's ``n`` images are numbered ``0 .. n-1`` and cut into shards of ``shard_size`` images
(shard ``j`` holds images ``[j K, min((j + 1) K, n))``). The shards, not the ranks, name the files,
so the files do not depend on how many processes wrote them:

* ``png``: one ``DIR/000123.png`` per image;
* ``npy``: one ``DIR/shard_000000-000999.npy`` per shard (float32 ``[k, C, H, W]`` in [-1, 1],
  both ends of the range included in the name);
* ``both``: both.

Rank ``r`` of ``W`` takes the contiguous run of shards ``[S r / W, S (r + 1) / W)``. Images are
drawn with per-image seeds (:mod:`fastddpm.sampling.noise`), so image ``i`` is the same however the
run is split or batched, and a restarted run may use another number of ranks or batch size.
Every file is written under a temporary name and then renamed (``os.replace``, atomic on one file
system): a killed run leaves whole files and temporary ones, never a half-written file under a
final name, so a restart skips exactly the images already written (for npy, whole shards) and
rewrites the rest. ``DIR/run.json`` holds the settings that decide the images; a restart with
other settings is refused rather than mixing two runs in one folder. When every rank is done,
rank 0 writes ``DIR/manifest.json`` (the settings and every file).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import torch

from . import distributed

FORMATS = ("png", "npy", "both")
RUN_FILE, MANIFEST = "run.json", "manifest.json"


@dataclass(frozen=True)
class Layout:
    """Which files a run of ``n`` images in shards of ``shard_size`` writes into ``folder``."""

    folder: str
    n: int
    shard_size: int
    fmt: str

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise ValueError(f"format: expected one of {FORMATS}, got {self.fmt!r}")
        for name in ("n", "shard_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")

    @property
    def digits(self) -> int:
        """Digits of an index in a file name: 6, or more for a run of a million images or more."""
        return max(6, len(str(self.n - 1)))

    @property
    def shards(self) -> int:
        """The number of shards."""
        return -(-self.n // self.shard_size)

    def shard(self, j: int) -> range:
        """The image indices of shard ``j``."""
        return range(j * self.shard_size, min((j + 1) * self.shard_size, self.n))

    def png(self, i: int) -> str:
        """The file name of image ``i``'s PNG."""
        return f"{i:0{self.digits}d}.png"

    def npy(self, j: int) -> str:
        """The file name of shard ``j``'s array."""
        r = self.shard(j)
        return f"shard_{r.start:0{self.digits}d}-{r.stop - 1:0{self.digits}d}.npy"

    def files(self, j: int) -> List[str]:
        """Every file of shard ``j``, in index order."""
        names = [self.png(i) for i in self.shard(j)] if self.fmt in ("png", "both") else []
        return names + ([self.npy(j)] if self.fmt in ("npy", "both") else [])

    def exists(self, name: str) -> bool:
        """Whether ``name`` was written (a final name only ever holds a whole file)."""
        return os.path.exists(os.path.join(self.folder, name))

    def missing(self, j: int) -> List[int]:
        """The indices of shard ``j`` still to sample: all of them while its npy is missing,
        else those whose PNG is missing."""
        if self.fmt in ("npy", "both") and not self.exists(self.npy(j)):
            return list(self.shard(j))
        if self.fmt == "npy":
            return []
        return [i for i in self.shard(j) if not self.exists(self.png(i))]


def rank_shards(shards: int, rank: int, world: int) -> range:
    """The contiguous run of shards rank ``rank`` of ``world`` writes (sizes differ by at most one)."""
    return range(shards * rank // world, shards * (rank + 1) // world)


def runs(indices: Sequence[int]) -> Iterator[Tuple[int, int]]:
    """``(first, count)`` of each run of consecutive values in the sorted ``indices``."""
    start = prev = None
    for i in indices:
        if prev is not None and i == prev + 1:
            prev = i
            continue
        if start is not None:
            yield start, prev - start + 1
        start = prev = i
    if start is not None:
        yield start, prev - start + 1


def write_atomic(folder: str, name: str, write: Callable) -> None:
    """``write(file)`` into ``folder/.name.tmp``, then renamed to ``folder/name``: a kill before
    the rename leaves only the temporary file, which the next attempt overwrites."""
    tmp = os.path.join(folder, f".{name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, os.path.join(folder, name))


def save_png(f, image: torch.Tensor) -> None:
    """One image in [-1, 1], ``[C, H, W]``, as a PNG into the open file ``f``."""
    from PIL import Image

    from .images import to_uint8

    array = to_uint8(image[None])[0].permute(1, 2, 0).numpy()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(f, format="PNG")


def check_run(folder: str, settings: Dict) -> None:
    """Refuse a folder holding another run's images (its ``run.json`` differs from ``settings``);
    rank 0 records ``settings`` there for a run starting afresh."""
    path = os.path.join(folder, RUN_FILE)
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        differ = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        if differ:
            there = {k: previous.get(k) for k in differ}
            now = {k: settings.get(k) for k in differ}
            raise ValueError(f"--out-dir: {folder} holds images of another run ({there} there, {now} now); "
                             f"use a new folder, or the same settings to resume")
    elif distributed.is_main():
        write_atomic(folder, RUN_FILE, lambda f: f.write(json.dumps(settings, indent=1).encode()))


def write_shard(layout: Layout, j: int, draw: Callable[[int, int], torch.Tensor],
                progress: Callable[[int], None]) -> int:
    """Sample and write what shard ``j`` lacks; ``draw(first, count)`` samples images
    ``[first, first + count)``. Returns the number of images sampled."""
    todo = layout.missing(j)
    images: Dict[int, torch.Tensor] = {}
    for first, count in runs(todo):
        x = draw(first, count).cpu()
        for k in range(count):
            images[first + k] = x[k]
        progress(count)
    if layout.fmt in ("png", "both"):
        for i in todo:
            if not layout.exists(layout.png(i)):
                write_atomic(layout.folder, layout.png(i), lambda f, i=i: save_png(f, images[i]))
    if layout.fmt in ("npy", "both") and not layout.exists(layout.npy(j)):  # then todo is the whole shard
        import numpy as np

        stack = torch.stack([images[i] for i in layout.shard(j)]).float().numpy()
        write_atomic(layout.folder, layout.npy(j), lambda f: np.save(f, stack))
    return len(todo)


def write_manifest(layout: Layout, settings: Dict) -> List[str]:
    """After every rank is done: rank 0 checks that every file exists and writes
    ``manifest.json``. Returns the files (on every rank)."""
    files = [name for j in range(layout.shards) for name in layout.files(j)]
    if distributed.is_main():
        lost = [name for name in files if not layout.exists(name)]
        if lost:
            raise RuntimeError(f"{len(lost)} files missing after every rank finished, e.g. {lost[:3]}")
        manifest = dict(settings, files=files)
        write_atomic(layout.folder, MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    return files


def sample_to_folder(layout: Layout, settings: Dict, draw: Callable[[int, int], torch.Tensor],
                     progress: bool = True) -> Tuple[int, List[str]]:
    """This rank's share of a ``--out-dir`` run (module docstring): the missing images of its
    shards sampled with ``draw(first, count)`` and written; then, when every rank is done, the
    manifest. Returns ``(images sampled by this rank, the run's files)``."""
    from tqdm.auto import tqdm

    os.makedirs(layout.folder, exist_ok=True)
    check_run(layout.folder, settings)
    mine = rank_shards(layout.shards, distributed.rank(), distributed.world_size())
    total = sum(len(layout.shard(j)) for j in mine)
    sampled = 0
    # the bar counts this rank's images, on rank 0 only (ranks have equal shares, to one shard)
    with tqdm(total=total, disable=not (progress and distributed.is_main()), desc="images", unit="img") as bar:
        bar.update(total - sum(len(layout.missing(j)) for j in mine))
        for j in mine:
            sampled += write_shard(layout, j, draw, bar.update)
    distributed.barrier()
    return sampled, write_manifest(layout, settings)
