"""Model preparation: one function turns a user's model and :class:`SpeedOptions` into the callable
the sampler's loop runs (Winograd convolutions, channels_last, compilation or freezing, the op
backend inside the model, autocast to the compute dtype)."""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Callable, Dict, Iterator, Optional

import torch

from .. import ops
from ..models.winograd import available as winograd_available
from ..models.winograd import with_winograd_convs
from ..utils import cpu_has_bf16_arithmetic
from .options import SpeedOptions

# Inductor options of the default compile mode on the CPU: the C++ wrapper calls the kernels
# without a Python frame each (docs/performance.md).
CPU_INDUCTOR_CONFIG: Dict[str, object] = {"cpp_wrapper": True}


def _compile_frozen(gm: torch.fx.GraphModule, example_inputs) -> Callable:
    """Inductor, as the backend of frozen models only (see ``SpeedOptions.freeze``)."""
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def compile_mode(options: SpeedOptions) -> Optional[str]:
    """The ``mode`` handed to ``torch.compile`` for ``options.compile`` (None: Inductor's default).
    Under ``cuda_graph`` the sampler's graphs capture the whole step, so no Inductor cudagraphs may
    nest inside: ``"reduce-overhead"`` (cudagraphs only) becomes the default mode and
    ``"max-autotune"`` keeps its autotuned convolution/GEMM templates without cudagraphs."""
    mode = None if options.compile in (True, "default") else options.compile
    if options.cuda_graph:
        mode = {"reduce-overhead": None, "max-autotune": "max-autotune-no-cudagraphs"}.get(mode, mode)
    return mode


def winograd_applies(model, device: torch.device, options: SpeedOptions) -> bool:
    """Whether ``options.winograd`` is on for ``model`` on ``device``: asked for (True) or by
    default (None) where it applies — an ``nn.Module`` run on the CPU in float32 or bfloat16 with
    the native extension built. Asking for it where it cannot apply is a ValueError."""
    applies = (device.type == "cpu" and options.dtype in (torch.float32, torch.bfloat16)
               and isinstance(model, torch.nn.Module) and winograd_available())
    if options.winograd and not applies:
        raise ValueError(f"winograd: needs an nn.Module run on the CPU in float32 or bfloat16 and the native "
                         f"extension, got {type(model).__name__} on {device} in {options.dtype} "
                         f"(native: {ops.native_status()})")
    return applies if options.winograd is None else options.winograd


class PreparedModel:
    """``model(x, t)`` as the sampler runs it: prepared once, called every step; returns float32
    like ``x`` whatever the compute dtype."""

    def __init__(self, model: Callable, device: torch.device, options: SpeedOptions):
        if not callable(model):
            raise TypeError(f"model: expected an eps_model(x, t) callable or nn.Module, got {type(model).__name__}")
        if options.freeze and not isinstance(model, torch.nn.Module):
            raise ValueError(f"freeze: folds the weights of an nn.Module into its compiled model; got "
                             f"{type(model).__name__}")
        if options.cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph: needs a CUDA device, got {device}")
        if device.type == "cpu" and options.dtype == torch.bfloat16 and cpu_has_bf16_arithmetic() is False:
            warnings.warn("dtype=bfloat16 on a CPU without bf16 arithmetic (no avx512_bf16 or amx_bf16 flag): it is "
                          "emulated, and several times slower than float32 on such a CPU (docs/performance.md); "
                          "dtype='float32' is faster here", stacklevel=3)
        self.device, self.options = device, options
        self.dtype = options.dtype
        self.winograd = winograd_applies(model, device, options)
        self._inductor_patch: Optional[Dict[str, object]] = None
        self.module = self._prepare(model)
        # The op backend inside the model, fixed here, since captured graphs must run the kernels
        # their warm-up ran. On the CPU "auto" per call (native in float32, the reference in
        # bf16/fp16), compiled too: the native group norm beats Inductor's there. On CUDA the fused
        # kernels eagerly; under torch.compile the reference ops, which Inductor fuses with their
        # neighbours.
        if device.type == "cpu":
            self.op_backend = ops.forced_backend() or "auto"
        else:
            self.op_backend = "reference" if options.compile is not False else \
                ops.auto_backend(device, graph=options.cuda_graph)

    def _prepare(self, model):
        options = self.options
        if self.winograd:
            model = with_winograd_convs(model, dtypes=(self.dtype,))  # only the tables this run can use
        if isinstance(model, torch.nn.Module) and options.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if options.compile is False:
            return model
        mode = compile_mode(options)
        inductor = dict(CPU_INDUCTOR_CONFIG) if mode is None and self.device.type == "cpu" else {}
        if options.freeze:
            # Freezing must be on while dynamo traces, which torch.compile(options=...) is too late
            # for (torch 2.14), so these settings are patched around the loop (running()).
            self._inductor_patch = {**inductor, **(torch._inductor.list_mode_options(mode) if mode else {}),
                                    "freezing": True}
            # a snapshot, compiled by a backend of its own: dynamo's BACKEND_MATCH guard then never
            # hands this graph (weights baked in) to another compile of the model, or the reverse
            return torch.compile(copy.deepcopy(model), backend=_compile_frozen, dynamic=False)
        if inductor:
            return torch.compile(model, dynamic=False, options=inductor)
        return torch.compile(model, mode=mode, dynamic=False)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """The context a loop of calls runs in: the op backend inside the model, Inductor's
        freezing settings (dynamo reads them while it traces) and autocast to the compute dtype.
        Entered around the loop, not per call, so a compiled step never sets it while traced."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(ops.use_backend(self.op_backend))
            if self._inductor_patch:
                stack.enter_context(torch._inductor.config.patch(self._inductor_patch))
            if self.dtype != torch.float32:
                stack.enter_context(torch.autocast(self.device.type, dtype=self.dtype))
            yield

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        m = self.module(x, t)
        if not torch.is_tensor(m) or m.shape != x.shape:
            raise ValueError(f"model: expected it to return a tensor shaped like x {tuple(x.shape)}, got "
                             f"{type(m).__name__} {tuple(getattr(m, 'shape', ()))}")
        return m if m.dtype == x.dtype else m.to(x.dtype)


def prepare_model(model: Callable, device, options: Optional[SpeedOptions] = None) -> PreparedModel:
    """``model`` prepared for sampling on ``device`` with ``options`` (see :class:`PreparedModel`)."""
    return PreparedModel(model, torch.device(device), options or SpeedOptions())
