"""The fast sampler: one prepared reverse process whose step loop allocates nothing and never waits
for the host.

Every sampler (ancestral DDPM with either variance, DDIM with any eta and either direction form,
respaced schedules) is the same step — ``m = model(x, t)``, then one ``ddpm_step`` with that
sampler's coefficient table (DESIGN.md section 2). :class:`Sampler` precomputes on the device what
the loop needs (coefficients, per-step timestep rows, noise buffers), then runs the loop eagerly,
with the model compiled (``compile=``), or as replays of captured CUDA graphs (``cuda_graph=``).

Noise: with a ``torch.Generator`` the draws are those of :func:`fastddpm.diffusion.reference_sample`
(``x_T`` first, then one draw per step that adds noise), so results equal the reference sampler's
in float32; without one, the step kernel draws counter-based Philox noise from a device-side state.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import ops
from .models.winograd import available as winograd_available
from .models.winograd import with_winograd_convs
from .ops import PhiloxState
from .schedule import Schedule
from .utils import cpu_has_bf16_arithmetic, resolve_device, same_device

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
COMPILE_MODES = (False, True, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Inductor options of the default compile mode on the CPU: the C++ wrapper calls the kernels
# without a Python frame each. Measured on the mnist step, frozen: bf16 16.1 vs 17.9 ms (its group
# norms are Inductor kernels); fp32 38.6 vs 38.8 ms (native group norms, fewer kernels to call).
CPU_INDUCTOR_CONFIG: Dict[str, object] = {"cpp_wrapper": True}


def resolve_dtype(dtype) -> torch.dtype:
    """``dtype`` given as a torch dtype or a name (``"bf16"``, ``"float16"``, ...)."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype: expected one of {sorted(set(DTYPES))} or the torch dtypes float32/bfloat16/"
                     f"float16, got {dtype!r}")


def _compile_frozen(gm: torch.fx.GraphModule, example_inputs) -> Callable:
    """Inductor, as the backend of frozen models only (see ``Sampler(freeze=True)``)."""
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


class Sampler:
    """A reverse process prepared for one model, schedule, sampler and batch shape.

    Args:
        model: ``eps_model(x, t)`` (or x0/v, per the coefficient table) mapping ``[B, C, H, W]`` and
            int64 model timesteps ``[B]`` to a tensor like ``x``.
        schedule: the (possibly respaced) schedule; index ``i`` runs ``S-1 .. 0`` and
            ``schedule.timesteps[i]`` is what the model sees.
        coeffs: ``schedule.table("step", device, ...)`` of the sampler.
        shape: ``(B, C, H, W)``.
        clip: bound for the predicted x0 (None: no clipping).
        dtype: the model's compute dtype (float32, or bfloat16/float16 through autocast); the
            state x stays float32.
        channels_last: run the model on channels_last tensors (an ``nn.Module`` is converted in
            place, as ``model.to(memory_format=...)`` does).
        compile: ``torch.compile`` the model (True or a mode name).
        freeze: with ``compile``, fold the weights into the compiled model (Inductor's freezing):
            on the CPU oneDNN then gets prepacked weights and fuses bias, SiLU and residual adds
            into the convolutions, and bf16 weights are cast once (mnist sampler here: 6-9% faster
            in fp32, 11-14% in bf16). The cost: a compile that Inductor cannot cache (~20-30 s for
            the mnist U-Net on 2 cores, every new sampler), and later changes to the model's
            weights do not reach this sampler (it compiles a copy).
        cuda_graph: capture steps as CUDA graphs and replay them (CUDA only).
        graph_steps: steps per captured graph (K); ``S`` steps replay ``S // K`` graphs and capture
            one more for a remainder.
        memory_pool: on CPU, run the loop inside :func:`fastddpm.ops.cpu_memory_pool`, so each
            step reuses the memory the last one freed instead of paying page faults for it.
        winograd: on CPU in float32, run a copy of the model whose 3x3 convolutions of 128 or more
            channels use Winograd's F(2x2, 3x3) (:mod:`fastddpm.models.winograd`): fewer
            multiplies, results within rounding of the direct convolution. None (default): on
            wherever it applies (a float32 ``nn.Module`` on the CPU, native extension built).
    """

    def __init__(self, model: Callable, schedule: Schedule, coeffs: torch.Tensor, shape: Sequence[int], *,
                 clip: Optional[float] = 1.0, device="cpu", dtype=torch.float32, channels_last: bool = False,
                 compile=False, cuda_graph: bool = False, graph_steps: int = 1, memory_pool: bool = True,
                 winograd: Optional[bool] = None, freeze: bool = False):
        self.device = resolve_device(device)
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != 4 or min(self.shape) < 1:
            raise ValueError(f"shape: expected (B, C, H, W) of positive sizes, got {tuple(shape)}")
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile: expected one of {COMPILE_MODES}, got {compile!r}")
        if freeze and (compile is False or not isinstance(model, torch.nn.Module)):
            raise ValueError(f"freeze: folds the weights of an nn.Module into its compiled model; it needs "
                             f"compile=True (or a mode) and an nn.Module, got compile={compile!r} and "
                             f"{type(model).__name__}")
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph: needs a CUDA device, got {self.device}")
        if not isinstance(graph_steps, int) or graph_steps < 1:
            raise ValueError(f"graph_steps: expected a positive int, got {graph_steps!r}")
        if tuple(coeffs.shape) != (schedule.T, 6) or coeffs.device != self.device:
            raise ValueError(f"coeffs: expected a [{schedule.T}, 6] table on {self.device}, got "
                             f"{tuple(coeffs.shape)} on {coeffs.device}")
        self.schedule, self.coeffs, self.clip = schedule, coeffs, clip
        self.dtype = resolve_dtype(dtype)
        if self.device.type == "cpu" and self.dtype == torch.bfloat16 and cpu_has_bf16_arithmetic() is False:
            warnings.warn("dtype=bfloat16 on a CPU without bf16 arithmetic (no avx512_bf16 or amx_bf16 flag): "
                          "it is emulated, and measured 5-6x slower than float32 on such a CPU; "
                          "dtype='float32' is faster here", stacklevel=2)
        self.channels_last = channels_last
        self.cuda_graph, self.graph_steps = cuda_graph, graph_steps
        applies = (self.device.type == "cpu" and self.dtype == torch.float32 and isinstance(model, torch.nn.Module)
                   and winograd_available())
        if winograd and not applies:
            raise ValueError(f"winograd: needs an nn.Module run on the CPU in float32 and the native extension, "
                             f"got {type(model).__name__} on {self.device} in {self.dtype} "
                             f"(native: {ops.native_status()})")
        self.winograd = applies if winograd is None else bool(winograd)
        self.memory_pool = bool(memory_pool) and self.device.type == "cpu"
        self.steps = schedule.T
        B = self.shape[0]
        # Row i of each table is a view the loop takes without allocating: the schedule index i
        # (what the step op reads coefficients with) and the model's timestep.
        self.step_rows = torch.arange(self.steps, device=self.device).repeat_interleave(B).view(self.steps, B)
        self.model_rows = schedule.timesteps.to(self.device).repeat_interleave(B).view(self.steps, B)
        # Which steps add noise: read once here, so the loop never asks the device.
        self.noisy: List[bool] = (coeffs[:, 5] > 0).tolist()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.x = torch.empty(self.shape, device=self.device).contiguous(memory_format=fmt)
        self.z = torch.empty(self.shape, device=self.device)
        self.zeros = torch.zeros_like(self.x)
        self._freeze_config: Optional[Dict[str, object]] = None
        self.model = self._prepare_model(model, compile, freeze)
        # The op backends, fixed here, since captured graphs must run the kernels their warm-up ran
        # (on CUDA "auto" picks Triton under capture, native eagerly). Inside the model on CUDA: the
        # fused kernels; under torch.compile the reference ops, which Inductor fuses with their
        # neighbours. On the CPU "auto" per call (native in float32, the reference in bf16/fp16),
        # compiled too: Inductor's channels_last group norms of 4-12 channels a group are slower
        # than the native kernel (mnist U-Net step, compiled: 36.7 vs 38.8 ms).
        self.step_ops = ops.auto_backend(self.device, graph=cuda_graph)
        if self.device.type == "cpu":
            self.model_ops = self.step_ops if ops.forced_backend() else "auto"
        else:
            self.model_ops = "reference" if compile else self.step_ops
        self._graphs: Dict[Tuple[int, bool], torch.cuda.CUDAGraph] = {}

    # ------------------------------------------------------------------------------- the step
    def _prepare_model(self, model, compile, freeze):
        if self.winograd:
            model = with_winograd_convs(model)
        if isinstance(model, torch.nn.Module) and self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if compile is False:
            return model
        mode = None if compile in (True, "default") else compile
        if self.cuda_graph:  # our graphs capture the whole step: no cudagraphs nested inside them
            mode = {"reduce-overhead": None, "max-autotune": "max-autotune-no-cudagraphs"}.get(mode, mode)
        options = dict(CPU_INDUCTOR_CONFIG) if mode is None and self.device.type == "cpu" else {}
        if freeze:
            # Freezing must be on while dynamo traces, which torch.compile(options=...) is too late
            # for (in torch 2.14), so these settings are patched around each call (_model_out).
            self._freeze_config = {**options, **(torch._inductor.list_mode_options(mode) if mode else {}),
                                   "freezing": True}
            # a snapshot, compiled by a backend of its own: dynamo's BACKEND_MATCH guard then never
            # hands this graph (weights baked in) to another compile of the model, or the reverse
            return torch.compile(copy.deepcopy(model), backend=_compile_frozen, dynamic=False)
        if options:
            return torch.compile(model, dynamic=False, options=options)
        return torch.compile(model, mode=mode, dynamic=False)

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _model_out(self, t_model: torch.Tensor) -> torch.Tensor:
        config = torch._inductor.config.patch(self._freeze_config) if self._freeze_config else \
            contextlib.nullcontext()
        with ops.use_backend(self.model_ops), config:
            m = self.model(self.x, t_model)
        return m if m.dtype == self.x.dtype else m.to(self.x.dtype)

    def _step(self, t_model: torch.Tensor, t_step: torch.Tensor, noise: Optional[torch.Tensor],
              rng: Optional[PhiloxState], with_x0: bool = False) -> Optional[torch.Tensor]:
        """x <- one step of the reverse process, in place: model timesteps ``t_model``, schedule
        indices ``t_step`` (``noise=None`` with ``rng``: in-kernel noise). With ``with_x0``, returns
        the x0 the model predicted from the x before the step (clipped like the step)."""
        m = self._model_out(t_model)
        x0 = ops.reference.predicted_x0(self.x, m, t_step, self.coeffs, self.clip) if with_x0 else None
        ops.ddpm_step(self.x, m, t_step, self.coeffs, noise, self.clip, out=self.x, rng=rng, trusted_t=True,
                      backend=self.step_ops)
        return x0

    # ------------------------------------------------------------------------------- the loop
    @torch.no_grad()
    def run(self, *, generator: Optional[torch.Generator] = None, rng: Optional[PhiloxState] = None,
            x_T: Optional[torch.Tensor] = None, callback: Optional[Callable] = None,
            progress: bool = False) -> torch.Tensor:
        """Run all steps from ``x_T`` (given, or drawn) and return x_0 (a new float32 tensor).

        ``generator``: draw x_T and every step's noise with ``torch.randn`` (the reference
        sampler's draws); else ``rng`` (a :class:`PhiloxState`; default: seeded from torch's RNG)
        drives in-kernel noise. ``callback(i, t, x, x0)`` after each step gets the schedule index,
        the model timestep, the new x and the x0 the model predicted at that step (eager loop only;
        it is a hook for progress and recording, so it makes the loop wait for each step).
        """
        if generator is not None and rng is not None:
            raise ValueError("generator / rng: give one noise source, not both")
        if generator is not None and not same_device(generator.device, self.device):
            raise ValueError(f"generator: expected a generator on {self.device}, got one on {generator.device}")
        if generator is None and rng is None:
            rng = PhiloxState(device=self.device)
        if x_T is not None:
            if tuple(x_T.shape) != self.shape:
                raise ValueError(f"x_T: expected shape {self.shape}, got {tuple(x_T.shape)}")
            self.x.copy_(x_T)
        elif generator is not None:
            self.x.copy_(torch.randn(self.shape, generator=generator, device=self.device))
        else:
            self.x.copy_(rng.randn(self.shape))
        if self.cuda_graph:
            if callback is not None:
                raise ValueError("callback: not available with cuda_graph=True (the graphs run many steps "
                                 "without returning to Python); use the eager loop")
            if generator is not None:
                raise ValueError("generator: cuda_graph=True draws in-kernel Philox noise; pass rng= "
                                 "(a PhiloxState) or nothing")
            self._run_graphs(rng, progress)
        else:
            self._run_eager(generator, rng, callback, progress)
        return self.x.clone()

    def _noise_for(self, i: int, generator, rng):
        """(noise, rng) for step i: a generator draw into the buffer, zeros, or in-kernel Philox."""
        if not self.noisy[i]:
            return self.zeros, None
        if generator is not None:
            return torch.randn(self.shape, generator=generator, device=self.device, out=self.z), None
        return None, rng

    def _run_eager(self, generator, rng, callback, progress):
        from tqdm.auto import tqdm

        pool = ops.cpu_memory_pool() if self.memory_pool else contextlib.nullcontext()
        with pool, self._autocast():
            for i in tqdm(range(self.steps - 1, -1, -1), total=self.steps, disable=not progress,
                          desc="sample", unit="step", leave=False):
                noise, state = self._noise_for(i, generator, rng)
                x0 = self._step(self.model_rows[i], self.step_rows[i], noise, state, with_x0=callback is not None)
                if callback is not None:
                    callback(i, int(self.schedule.timesteps[i]), self.x, x0)

    # -------------------------------------------------------------------------- CUDA graphs
    def _blocks(self) -> List[Tuple[int, bool]]:
        """(length, noisy) of the runs of steps, from the last index down, replayed as one graph each."""
        blocks, i = [], self.steps - 1
        while i >= 0:
            k = 1
            while k < self.graph_steps and i - k >= 0 and self.noisy[i - k] == self.noisy[i]:
                k += 1
            blocks.append((k, self.noisy[i]))
            i -= k
        return blocks

    def _capture(self, length: int, noisy: bool) -> torch.cuda.CUDAGraph:
        """A graph of ``length`` steps that reads the step index from ``self._index`` (a device
        scalar it decrements), so one graph serves every block of that length."""
        def steps():
            for _ in range(length):
                i = self._index
                self._step(self.model_rows.index_select(0, i).view(-1), self.step_rows.index_select(0, i).view(-1),
                           None if noisy else self.zeros, self._graph_rng if noisy else None)
                i.sub_(1)

        saved_x, saved_state, saved_index = self.x.clone(), self._graph_rng.tensor.clone(), self._index.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), self._autocast():
            steps()  # warm-up outside the graph: compiles and tunes kernels, sets up workspaces
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool), self._autocast():
            steps()
        self.x.copy_(saved_x)
        self._graph_rng.tensor.copy_(saved_state)
        self._index.copy_(saved_index)
        return graph

    def _run_graphs(self, rng: PhiloxState, progress: bool):
        from tqdm.auto import tqdm

        if not hasattr(self, "_index"):
            self._index = torch.zeros(1, dtype=torch.int64, device=self.device)
            self._graph_rng = PhiloxState(0, device=self.device)
            self._pool = torch.cuda.graph_pool_handle()
        # the graphs read and advance their own state tensor: load the caller's into it, and back
        self._graph_rng.tensor.copy_(rng.tensor)
        self._index.fill_(self.steps - 1)
        blocks = self._blocks()
        for key in set(blocks):
            if key not in self._graphs:
                self._graphs[key] = self._capture(*key)
        with tqdm(total=self.steps, disable=not progress, desc="sample", unit="step", leave=False) as bar:
            for length, noisy in blocks:
                self._graphs[(length, noisy)].replay()
                bar.update(length)
        rng.tensor.copy_(self._graph_rng.tensor)
