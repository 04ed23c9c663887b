"""``SpeedOptions``: how the reverse process runs — precision, layout, kernels, compilation, graphs.

One object, validated in one place, shared by :func:`fastddpm.sample`, :class:`fastddpm.Sampler`
and the ``fastddpm sample`` command. None of these options changes what is sampled beyond float
rounding; they change how fast. Measured effects per machine are in docs/performance.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
COMPILE_MODES = (False, True, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def resolve_dtype(dtype) -> torch.dtype:
    """``dtype`` given as a torch dtype or a name (``"bf16"``, ``"float16"``, ...)."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype: expected one of {sorted(set(DTYPES))} or the torch dtypes float32/bfloat16/"
                     f"float16, got {dtype!r}")


@dataclass(frozen=True)
class SpeedOptions:
    """How the sampler runs the model and the loop (hashable: prepared samplers are cached by it).

    Attributes:
        dtype: the model's compute dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (autocast;
            the state x stays float32). bf16 is fast on GPUs and on CPUs with bf16 arithmetic
            (``avx512_bf16`` / ``amx_bf16``); elsewhere it is emulated and slower than float32, and
            the sampler warns.
        channels_last: run the model on channels_last tensors (a given ``nn.Module`` is converted
            in place, as ``model.to(memory_format=...)`` does). On by default: faster on both devices.
        compile: ``torch.compile`` the model: ``True`` or a mode, ``"default"``, ``"reduce-overhead"``,
            ``"max-autotune"`` (autotuned convolution/GEMM templates: a longer compile) or
            ``"max-autotune-no-cudagraphs"``. With ``cuda_graph`` the sampler's own graphs replace
            Inductor's: ``"reduce-overhead"`` then compiles as ``"default"`` and ``"max-autotune"``
            as ``"max-autotune-no-cudagraphs"``.
        freeze: with ``compile``, fold the weights into the compiled model (Inductor's freezing):
            on the CPU oneDNN then gets prepacked weights and fused bias/SiLU/residual adds, and bf16
            weights are cast once. The price: a compile Inductor cannot cache, and a snapshot of the
            weights (a prepared sampler notices later changes and prepares again).
        cuda_graph: capture the steps as CUDA graphs and replay them (CUDA; in-kernel Philox noise).
        graph_steps: steps per captured graph; ``S`` steps replay ``S // graph_steps`` graphs and
            capture one more for a remainder.
        winograd: on the CPU, run a copy of the model whose wide 3x3 convolutions use Winograd
            F(4x4, 3x3) or F(2x2, 3x3) where measured faster (fewer multiplies, results within
            rounding; the rule: :func:`fastddpm.models.winograd.choose_tile`; in bfloat16 only
            wide convolutions on small images). None (default): wherever it applies (an
            ``nn.Module``, CPU, float32 or bfloat16, native extension).
        memory_pool: on the CPU, run the loop inside :func:`fastddpm.ops.cpu_memory_pool`, so each
            step reuses the memory the last one freed instead of paying page faults for it.
    """

    dtype: Union[str, torch.dtype] = "float32"
    channels_last: bool = True
    compile: Union[bool, str] = False
    freeze: bool = False
    cuda_graph: bool = False
    graph_steps: int = 1
    winograd: Optional[bool] = None
    memory_pool: bool = True

    def __post_init__(self):
        object.__setattr__(self, "dtype", resolve_dtype(self.dtype))
        for name in ("channels_last", "freeze", "cuda_graph", "memory_pool"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        if self.winograd is not None and not isinstance(self.winograd, bool):
            raise TypeError(f"winograd: expected None or a bool, got {self.winograd!r}")
        if not any(self.compile is mode or (isinstance(mode, str) and self.compile == mode) for mode in COMPILE_MODES):
            raise ValueError(f"compile: expected one of {COMPILE_MODES}, got {self.compile!r}")
        if self.freeze and self.compile is False:
            raise ValueError("freeze: folds a model's weights into its compiled form; it needs compile=True "
                             "(or a mode), got compile=False")
        if not isinstance(self.graph_steps, int) or isinstance(self.graph_steps, bool) or self.graph_steps < 1:
            raise ValueError(f"graph_steps: expected a positive int, got {self.graph_steps!r}")

    @classmethod
    def describe(cls, name: str) -> str:
        """The first sentence of field ``name``'s entry in this docstring (the CLI's help text)."""
        entry, lines = [], cls.__doc__.split("Attributes:", 1)[1].splitlines()
        for line in lines:
            if line.startswith(f"        {name}:"):
                entry.append(line.split(":", 1)[1].strip())
            elif entry and line.startswith("            "):
                entry.append(line.strip())
            elif entry:
                break
        if not entry:
            raise KeyError(f"name: {name!r} is not a documented field of SpeedOptions")
        text = " ".join(entry).split(". ")[0].rstrip(".")
        return text.replace("``", "").replace(":func:", "").replace("`", "")

    @classmethod
    def from_arguments(cls, options: Optional["SpeedOptions"] = None, **overrides) -> "SpeedOptions":
        """``options`` (or the defaults) with the keyword ``overrides`` applied: the form
        :func:`fastddpm.sample` and :class:`fastddpm.Sampler` accept (an options object, keywords, or both)."""
        if options is not None and not isinstance(options, SpeedOptions):
            raise TypeError(f"options: expected a fastddpm.SpeedOptions, got {type(options).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"{', '.join(unknown)}: unexpected keyword argument(s); the speed options are "
                            f"{sorted(names)}")
        return dataclasses.replace(options or cls(), **overrides) if overrides else (options or cls())
