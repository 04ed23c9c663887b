"""The fast sampler: one prepared reverse process whose step loop allocates nothing and never waits
for the host.

Every sampler (ancestral DDPM with either variance, DDIM with any eta and either direction form,
respaced schedules) is the same step — ``m = model(x, t)``, then one ``ddpm_step`` with that
sampler's coefficient table (docs/design.md). :class:`Sampler` precomputes on the device what the
loop needs (coefficients, per-step timestep rows, buffers), then runs the loop eagerly or as
replays of captured CUDA graphs. A run can start at any step from a given x_t (partial diffusion,
edits) and take a per-step hook that edits x on the device (inpainting).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import ops
from .. import checks
from ..ops import PhiloxState
from ..schedule import Schedule
from ..utils import resolve_device
from .noise import NoiseSource, PhiloxNoise
from .options import SpeedOptions
from .prepare import prepare_model

StepHook = Callable[[torch.Tensor, torch.Tensor], None]


class NonFiniteWarning(RuntimeWarning):
    """A reverse process ended with NaN or infinite values (the ``fastddpm`` command treats it as an error)."""


def report_nonfinite(x: torch.Tensor, dtype: torch.dtype) -> None:
    """Warn once (a :class:`NonFiniteWarning`) when the images ``x`` hold NaN or inf, naming the
    likely cause; one reduction and one host read, at the end of a run, never per step."""
    bad = (~torch.isfinite(x)).flatten(1).any(1)
    count = int(bad.sum())
    if not count:
        return
    cause = ("the model's output overflowed in " + str(dtype).replace("torch.", "") + "; try dtype='float32'"
             if dtype in (torch.float16, torch.bfloat16) else
             "the model returned NaN or inf (weights that are NaN, diverged training, or a model that is not "
             "an eps/x0/v predictor)")
    warnings.warn(f"samples: {count} of {x.shape[0]} images contain NaN or infinite values; likely cause: {cause}",
                  NonFiniteWarning, stacklevel=3)


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
        device: where the loop runs.
        options: :class:`SpeedOptions`; keyword arguments (``dtype=``, ``compile=``, ...) override
            its fields.
    """

    def __init__(self, model: Callable, schedule: Schedule, coeffs: torch.Tensor, shape: Sequence[int], *,
                 clip: Optional[float] = 1.0, device="cpu", options: Optional[SpeedOptions] = None, **speed):
        self.options = SpeedOptions.from_arguments(options, **speed)
        self.device = resolve_device(device)
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != 4 or min(self.shape) < 1:
            raise ValueError(f"shape: expected (B, C, H, W) of positive sizes, got {tuple(shape)}")
        if not torch.is_tensor(coeffs) or tuple(coeffs.shape) != (schedule.T, 6) or coeffs.device != self.device:
            raise ValueError(f"coeffs: expected a [{schedule.T}, 6] table on {self.device}, got "
                             f"{tuple(getattr(coeffs, 'shape', ()))} on {getattr(coeffs, 'device', None)}")
        if clip is not None:
            clip = checks.positive_float("clip", clip, finite=False)
        self.schedule, self.coeffs, self.clip = schedule, coeffs, clip
        self.model = prepare_model(model, self.device, self.options)
        self.steps = schedule.T
        self.memory_pool = self.options.memory_pool and self.device.type == "cpu"
        B = self.shape[0]
        # Row i of each table is a view the loop takes without allocating: the schedule index i
        # (what the step op reads coefficients with) and the model's timestep.
        self.step_rows = torch.arange(self.steps, device=self.device).repeat_interleave(B).view(self.steps, B)
        self.model_rows = schedule.timesteps.to(self.device).repeat_interleave(B).view(self.steps, B)
        # Which steps add noise: read once here, so the loop never asks the device.
        self.noisy: List[bool] = (coeffs[:, 5] > 0).tolist()
        fmt = torch.channels_last if self.options.channels_last else torch.contiguous_format
        self.x = torch.empty(self.shape, device=self.device).contiguous(memory_format=fmt)
        self.z = torch.empty(self.shape, device=self.device)
        self.zeros = torch.zeros_like(self.x)
        # The step op's backend, fixed here: captured graphs must run the kernels their warm-up ran.
        self.step_ops = ops.auto_backend(self.device, graph=self.options.cuda_graph)
        self._graphs: Dict[Tuple[int, bool, int], torch.cuda.CUDAGraph] = {}
        self._graph_hooks: Dict[int, Optional[StepHook]] = {}

    # ------------------------------------------------------------------------------- the step
    def _step(self, t_model: torch.Tensor, t_step: torch.Tensor, noise: Optional[torch.Tensor],
              rng: Optional[PhiloxState], with_x0: bool = False) -> Optional[torch.Tensor]:
        """x <- one step of the reverse process, in place: model timesteps ``t_model``, schedule
        indices ``t_step`` (``noise=None`` with ``rng``: in-kernel noise). With ``with_x0``, returns
        the x0 the model predicted from the x before the step (clipped like the step)."""
        m = self.model(self.x, t_model)
        x0 = ops.reference.predicted_x0(self.x, m, t_step, self.coeffs, self.clip) if with_x0 else None
        ops.ddpm_step(self.x, m, t_step, self.coeffs, noise, self.clip, out=self.x, rng=rng, trusted_t=True,
                      backend=self.step_ops)
        return x0

    @torch.no_grad()
    def predict_x0(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """The model's prediction of x_0 from ``x`` at schedule index ``index`` (one model call,
        clipped like the steps): the one-shot posterior mean of an edit."""
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < self.steps:
            raise ValueError(f"index: expected a schedule index in [0, {self.steps}), got {index!r}")
        if not torch.is_tensor(x) or tuple(x.shape) != self.shape:
            raise ValueError(f"x: expected a tensor of shape {self.shape}, got {tuple(getattr(x, 'shape', ()))}")
        self.x.copy_(x)
        with self.model.running():
            m = self.model(self.x, self.model_rows[index])
        return ops.reference.predicted_x0(self.x, m, self.step_rows[index], self.coeffs, self.clip).float()

    # ------------------------------------------------------------------------------- the loop
    @torch.no_grad()
    def run(self, noise: Optional[NoiseSource] = None, *, generator: Optional[torch.Generator] = None,
            rng: Optional[PhiloxState] = None, x_T: Optional[torch.Tensor] = None, start: Optional[int] = None,
            stop: int = 0, step_hook: Optional[StepHook] = None, callback: Optional[Callable] = None,
            progress: bool = False) -> torch.Tensor:
        """Run the steps ``start, start-1, ..., stop`` and return the result (a new float32 tensor):
        x_0 when ``stop`` is 0, else the state at schedule index ``stop - 1``.

        noise: a :class:`NoiseSource`; or, for short, ``generator=`` (torch.randn draws, the
            reference sampler's) or ``rng=`` (in-kernel Philox); default: Philox seeded from
            torch's RNG.
        x_T: the state at schedule index ``start`` (default: drawn from the noise source).
        start: the schedule index to start at (default: the last, ``S - 1``); with ``x_T`` an
            x_t of a real image, the reverse process runs from there (partial diffusion).
        stop: the last schedule index to step (default 0: down to x_0); a segment of the process,
            for schedules that go back up between segments (RePaint's resampling).
        step_hook: ``step_hook(x, i)`` after each step, with the new x (edit it in place) and the
            ``[B]`` int64 device tensor of the schedule index just stepped; it runs inside the
            CUDA graphs too, so it must not read tensors on the host.
        callback: ``callback(i, t, x, x0)`` after each step: the schedule index, the model
            timestep, the new x and the x0 the model predicted (eager loop only; it makes the loop
            wait for each step).
        """
        noise = NoiseSource.given(noise, generator, rng, self.device)
        start = self.steps - 1 if start is None else start
        if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start < self.steps:
            raise ValueError(f"start: expected a schedule index in [0, {self.steps}), got {start!r}")
        if not isinstance(stop, int) or isinstance(stop, bool) or not 0 <= stop <= start:
            raise ValueError(f"stop: expected a schedule index in [0, start={start}], got {stop!r}")
        if x_T is not None:
            if not torch.is_tensor(x_T) or tuple(x_T.shape) != self.shape:
                raise ValueError(f"x_T: expected a tensor of shape {self.shape}, got "
                                 f"{tuple(getattr(x_T, 'shape', ()))}")
            self.x.copy_(x_T)
        else:
            self.x.copy_(noise.initial(self.shape, self.device))
        if self.options.cuda_graph:
            if callback is not None:
                raise ValueError("callback: not available with cuda_graph=True (the graphs run many steps "
                                 "without returning to Python); use step_hook, or the eager loop")
            if not isinstance(noise, PhiloxNoise):
                raise ValueError("noise_source: cuda_graph=True draws in-kernel Philox noise; pass rng= "
                                 "(a PhiloxState) or a 'philox' NoiseSource")
            self._run_graphs(noise.state, start, stop, step_hook, progress)
        else:
            self._run_eager(noise, start, stop, step_hook, callback, progress)
        result = self.x.clone()
        if stop == 0:
            report_nonfinite(result, self.options.dtype)
        return result

    def _run_eager(self, noise: NoiseSource, start: int, stop: int, step_hook, callback, progress: bool):
        from tqdm.auto import tqdm

        pool = ops.cpu_memory_pool() if self.memory_pool else contextlib.nullcontext()
        with pool, self.model.running():
            for i in tqdm(range(start, stop - 1, -1), total=start - stop + 1, disable=not progress, desc="sample",
                          unit="step", leave=False):
                z, state = noise.step(self.z) if self.noisy[i] else (self.zeros, None)
                x0 = self._step(self.model_rows[i], self.step_rows[i], z, state, with_x0=callback is not None)
                if step_hook is not None:
                    step_hook(self.x, self.step_rows[i])
                if callback is not None:
                    callback(i, int(self.schedule.timesteps[i]), self.x, x0)

    # -------------------------------------------------------------------------- CUDA graphs
    def _blocks(self, start: int, stop: int = 0) -> List[Tuple[int, bool]]:
        """(length, noisy) of the runs of steps, from ``start`` down to ``stop``, replayed as one graph each."""
        blocks, i = [], start
        while i >= stop:
            k = 1
            while k < self.options.graph_steps and i - k >= stop and self.noisy[i - k] == self.noisy[i]:
                k += 1
            blocks.append((k, self.noisy[i]))
            i -= k
        return blocks

    def _capture(self, length: int, noisy: bool, step_hook) -> torch.cuda.CUDAGraph:
        """A graph of ``length`` steps that reads the step index from ``self._index`` (a device
        scalar it decrements), so one graph serves every block of that length."""
        def steps():
            for _ in range(length):
                i = self._index
                t_step = self.step_rows.index_select(0, i).view(-1)
                self._step(self.model_rows.index_select(0, i).view(-1), t_step,
                           None if noisy else self.zeros, self._graph_rng if noisy else None)
                if step_hook is not None:
                    step_hook(self.x, t_step)
                i.sub_(1)

        saved_x, saved_state, saved_index = self.x.clone(), self._graph_rng.tensor.clone(), self._index.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), self.model.running():
            steps()  # warm-up outside the graph: compiles and tunes kernels, sets up workspaces
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool), self.model.running():
            steps()
        self.x.copy_(saved_x)
        self._graph_rng.tensor.copy_(saved_state)
        self._index.copy_(saved_index)
        return graph

    def _run_graphs(self, rng: PhiloxState, start: int, stop: int, step_hook, progress: bool):
        from tqdm.auto import tqdm

        if not hasattr(self, "_index"):
            self._index = torch.zeros(1, dtype=torch.int64, device=self.device)
            # with a base (per-image seeds) whatever the caller's state: one set of graphs serves both
            self._graph_rng = PhiloxState(0, device=self.device, base=0)
            self._pool = torch.cuda.graph_pool_handle()
        # the graphs read and advance their own state tensor: load the caller's into it, and back
        given = rng.tensor.numel()
        self._graph_rng.tensor[given:].zero_()  # a state without a base draws from number 0
        self._graph_rng.tensor[:given].copy_(rng.tensor)
        self._index.fill_(start)
        blocks = self._blocks(start, stop)
        hook_key = id(step_hook) if step_hook is not None else 0  # a graph captures its hook ...
        self._graph_hooks[hook_key] = step_hook  # ... kept alive, so its id is not reused
        for length, noisy in set(blocks):
            if (length, noisy, hook_key) not in self._graphs:
                self._graphs[(length, noisy, hook_key)] = self._capture(length, noisy, step_hook)
        with tqdm(total=start - stop + 1, disable=not progress, desc="sample", unit="step", leave=False) as bar:
            for length, noisy in blocks:
                self._graphs[(length, noisy, hook_key)].replay()
                bar.update(length)
        rng.tensor.copy_(self._graph_rng.tensor[:given])
