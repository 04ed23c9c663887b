"""Where the sampler's noise comes from, decided once per run.

Two sources, one interface (:meth:`NoiseSource.initial` for x_T, :meth:`NoiseSource.step` for a
step that adds noise):

* ``"generator"`` — ``torch.randn`` from a ``torch.Generator``, drawn in the reference sampler's
  order (x_T first, then one draw per noisy step): results equal
  :func:`fastddpm.reference_sample`'s in float32.
* ``"philox"`` — counter-based Philox4x32-10 noise drawn inside the step kernel from a device-side
  state (:class:`fastddpm.ops.PhiloxState`): no extra pass over memory, reproducible from the seed,
  and safe inside CUDA graphs (each draw advances the state on the device).

Either can be **per image** (:meth:`NoiseSource.per_image`): image ``i`` of a run with seed ``s``
gets its own stream (x_T and every step's noise), so a sample depends on ``(s, i)`` only — not on
the batch size, the batch order or how many processes share the run:

* ``"generator"``: image ``i`` draws from its own ``torch.Generator`` seeded with
  :func:`image_seed` ``(s, i)`` (splitmix64 of splitmix64(s) + i), one ``torch.randn(C, H, W)``
  per image and draw: ``B`` small draws a step instead of one.
* ``"philox"``: key ``s``; element ``k`` of image ``i`` at draw ``d`` is number ``i * C*H*W + k``
  of stream ``(s, d)`` — a batch starting at image ``i0`` is one kernel draw with the state's base
  at ``i0 * C*H*W`` (:class:`fastddpm.ops.PhiloxState`), so it costs nothing extra and still runs
  inside CUDA graphs. ``C*H*W`` must be a multiple of 4 (whole Philox blocks per image).
"""

from __future__ import annotations

import math
import random
from typing import List, Optional, Tuple

import torch

from ..ops import PhiloxState
from ..utils import same_device

NOISE_SOURCES = ("generator", "philox")
_MASK64 = 2**64 - 1


def _splitmix64(x: int) -> int:
    """One step of splitmix64 (Steele et al.): a bijective 64-bit mix, so nearby inputs give
    unrelated outputs."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def image_seed(seed: int, index: int) -> int:
    """The seed of image ``index``'s generator in a per-image run with ``seed``: a 64-bit hash of
    both (so images ``i`` and ``i + 1`` of one run, or image ``i`` of seeds ``s`` and ``s + 1``,
    start from unrelated generator states)."""
    return _splitmix64((_splitmix64(seed) + index) & _MASK64)


def resolve_seed(seed: Optional[int]) -> int:
    """``seed`` checked (an int in ``[0, 2**63)``), or a random one for ``None``."""
    if seed is None:
        return random.randrange(2**62)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"seed: expected an int in [0, 2**63), got {seed!r}")
    return seed


class NoiseSource:
    """The noise of one reverse-process run (see the module docstring)."""

    kind: str = ""

    def initial(self, shape, device: torch.device) -> torch.Tensor:
        """x_T: standard normal noise of ``shape``."""
        raise NotImplementedError

    def step(self, buffer: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[PhiloxState]]:
        """The noise argument of one noisy ``ops.ddpm_step``: ``(tensor, None)`` drawn into
        ``buffer``, or ``(None, state)`` for the kernel to draw from."""
        raise NotImplementedError

    def check_device(self, device: torch.device) -> None:
        """Raise a ValueError unless this source draws on ``device``."""

    @staticmethod
    def resolve(kind: str = "generator", *, seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
                rng: Optional[PhiloxState] = None, device="cpu") -> "NoiseSource":
        """The source a user asked for: ``kind`` with a ``seed`` (default: a random one), or an
        explicit ``generator`` (for ``"generator"``) or ``rng`` (for ``"philox"``), used as is."""
        _check_kind(kind)
        given_seed = seed is not None
        seed = resolve_seed(seed)
        device = torch.device(device)
        if kind == "generator":
            if rng is not None:
                raise ValueError("rng: a PhiloxState drives noise_source='philox'; with 'generator' pass generator=")
            if generator is None:
                generator = torch.Generator(device).manual_seed(seed)
            elif given_seed:
                raise ValueError("seed / generator: give one (a given generator carries its own seed)")
            return GeneratorNoise(generator)
        if generator is not None:
            raise ValueError("generator: not used with noise_source='philox'; pass seed= instead")
        if rng is None:
            rng = PhiloxState(seed, device=device)
        elif given_seed:
            raise ValueError("seed / rng: give one (a given PhiloxState carries its own seed)")
        return PhiloxNoise(rng)

    @staticmethod
    def per_image(kind: str, seed: int, first_index: int, image_shape, device="cpu") -> "NoiseSource":
        """The per-image source (module docstring) of a batch whose first image is image
        ``first_index`` of the run with ``seed``; ``image_shape`` is ``(C, H, W)``."""
        _check_kind(kind)
        seed = resolve_seed(seed)
        if not isinstance(first_index, int) or isinstance(first_index, bool) or first_index < 0:
            raise ValueError(f"first_index: expected an int >= 0, got {first_index!r}")
        if kind == "generator":
            return PerImageGeneratorNoise(seed, first_index, device)
        numel = math.prod(image_shape)
        if numel % 4:
            raise ValueError(f"shape: per-image Philox noise needs C*H*W to be a multiple of 4 (whole Philox "
                             f"blocks per image), got {tuple(image_shape)}; use noise_source='generator'")
        return PhiloxNoise(PhiloxState(seed, device=device, base=first_index * numel))

    @staticmethod
    def given(noise: Optional["NoiseSource"] = None, generator: Optional[torch.Generator] = None,
              rng: Optional[PhiloxState] = None, device="cpu") -> "NoiseSource":
        """The source of a :meth:`Sampler.run`: a ``NoiseSource``, or for short a ``generator``
        or an ``rng``; with none, Philox seeded from torch's RNG. Checked to draw on ``device``."""
        given = [name for name, v in (("noise", noise), ("generator", generator), ("rng", rng)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"noise / generator / rng: give one noise source, got {' and '.join(given)}")
        if noise is None:
            noise = GeneratorNoise(generator) if generator is not None else \
                PhiloxNoise(rng if rng is not None else PhiloxState(device=device))
        elif not isinstance(noise, NoiseSource):
            raise TypeError(f"noise: expected a fastddpm.NoiseSource, got {type(noise).__name__}")
        noise.check_device(torch.device(device))
        return noise


class GeneratorNoise(NoiseSource):
    """``torch.randn`` draws from ``generator`` (advanced by every draw)."""

    kind = "generator"

    def __init__(self, generator: torch.Generator):
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
        self.generator = generator

    def initial(self, shape, device) -> torch.Tensor:  # noqa: D102
        return torch.randn(tuple(shape), generator=self.generator, device=device)

    def step(self, buffer):  # noqa: D102
        return torch.randn(buffer.shape, generator=self.generator, device=buffer.device, out=buffer), None

    def check_device(self, device):  # noqa: D102
        if not same_device(self.generator.device, device):
            raise ValueError(f"generator: expected a generator on {device}, got one on {self.generator.device}")


class PerImageGeneratorNoise(NoiseSource):
    """``torch.randn`` draws from one generator per image, seeded with :func:`image_seed` ``(seed,
    first_index + j)`` for image ``j`` of the batch: each image's draws are those of a batch of one."""

    kind = "generator"

    def __init__(self, seed: int, first_index: int, device="cpu"):
        self.seed, self.first_index, self.device = seed, first_index, torch.device(device)
        self.generators: Optional[List[torch.Generator]] = None

    def _streams(self, count: int) -> List[torch.Generator]:
        """The batch's generators, made at the first draw (when the batch size is known)."""
        if self.generators is None:
            self.generators = [torch.Generator(self.device).manual_seed(image_seed(self.seed, self.first_index + j))
                               for j in range(count)]
        elif len(self.generators) != count:
            raise ValueError(f"shape: this per-image source draws for {len(self.generators)} images, got a "
                             f"batch of {count}")
        return self.generators

    def initial(self, shape, device) -> torch.Tensor:  # noqa: D102
        shape = tuple(shape)
        return torch.stack([torch.randn(shape[1:], generator=g, device=device) for g in self._streams(shape[0])])

    def step(self, buffer):  # noqa: D102
        for g, row in zip(self._streams(buffer.shape[0]), buffer):
            torch.randn(row.shape, generator=g, device=buffer.device, out=row)
        return buffer, None

    def check_device(self, device):  # noqa: D102
        if not same_device(self.device, device):
            raise ValueError(f"device: this per-image source draws on {self.device}, the sampler runs on {device}")


class PhiloxNoise(NoiseSource):
    """In-kernel Philox noise from ``state`` (advanced on the device by every draw)."""

    kind = "philox"

    def __init__(self, state: PhiloxState):
        if not isinstance(state, PhiloxState):
            raise TypeError(f"rng: expected a fastddpm.ops.PhiloxState, got {type(state).__name__}")
        self.state = state

    def initial(self, shape, device) -> torch.Tensor:  # noqa: D102
        return self.state.randn(tuple(shape))

    def step(self, buffer):  # noqa: D102
        return None, self.state

    def check_device(self, device):  # noqa: D102
        if not same_device(self.state.device, device):
            raise ValueError(f"rng: expected a PhiloxState on {device}, got one on {self.state.device}")


def _check_kind(kind: str) -> None:
    if kind not in NOISE_SOURCES:
        raise ValueError(f"noise_source: expected one of {NOISE_SOURCES}, got {kind!r}")


class SharedNoise(NoiseSource):
    """One draw of ``base`` shared by ``copies`` consecutive images: a batch of ``groups x copies``
    images whose copies of a group see the same noise at every step (an interpolation's lambdas).
    The draws are made as tensors and repeated, so this source does not run inside CUDA graphs."""

    def __init__(self, base: NoiseSource, copies: int):
        if not isinstance(base, NoiseSource):
            raise TypeError(f"base: expected a NoiseSource, got {type(base).__name__}")
        if not isinstance(copies, int) or copies < 1:
            raise ValueError(f"copies: expected a positive int, got {copies!r}")
        self.base, self.copies, self.kind = base, copies, base.kind

    def _group_shape(self, shape) -> Tuple[int, ...]:
        shape = tuple(shape)
        if shape[0] % self.copies:
            raise ValueError(f"shape: a batch of {shape[0]} is not a whole number of groups of {self.copies}")
        return (shape[0] // self.copies, *shape[1:])

    def initial(self, shape, device) -> torch.Tensor:  # noqa: D102
        return self.base.initial(self._group_shape(shape), device).repeat_interleave(self.copies, dim=0)

    def step(self, buffer):  # noqa: D102
        drawn = self.base.initial(self._group_shape(buffer.shape), buffer.device)
        return buffer.copy_(drawn.repeat_interleave(self.copies, dim=0)), None

    def check_device(self, device):  # noqa: D102
        self.base.check_device(device)
