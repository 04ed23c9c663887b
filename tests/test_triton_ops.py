"""The Triton kernels against the reference ops. Without a GPU they run on CPU tensors under
``TRITON_INTERPRET=1`` (set by conftest.py); on a GPU the same tests run on CUDA tensors, and the
opcheck / torch.compile / CUDA-graph tests, which the interpreter cannot run (DESIGN.md section 6),
run too."""

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fastddpm import Schedule, ops
from fastddpm.ops import PhiloxState, philox_normal, reference
from fastddpm.ops import triton as triton_backend
from oracle import assert_close_by_dtype, layout

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPU = DEVICE == "cuda"
pytestmark = pytest.mark.skipif(not triton_backend.runs_on(torch.device(DEVICE)),
                                reason=f"Triton cannot run on {DEVICE} here ({triton_backend.ERROR})")
needs_gpu = pytest.mark.skipif(not GPU, reason="the Triton interpreter cannot trace fake tensors (DESIGN.md 6)")

SCHED = Schedule.linear()
COEFFS = {v: SCHED.table("step", DEVICE, sampler="ddpm", variance=v) for v in ("fixed_small", "fixed_large")}
NOISING = SCHED.table("noising", DEVICE)
shapes = st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 9), st.integers(1, 9))
dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
layouts = st.sampled_from(["contiguous", "channels_last", "strided"])


def randn(*shape, generator):
    return torch.randn(*shape, generator=generator).to(DEVICE)


@settings(max_examples=25, deadline=None)
@given(shape=shapes, dtype=dtypes, kind=layouts, clip=st.sampled_from([None, 1.0]),
       variance=st.sampled_from(["fixed_small", "fixed_large"]), seed=st.integers(0, 2**31))
def test_ddpm_step_matches_reference(shape, dtype, kind, clip, variance, seed):
    g = torch.Generator().manual_seed(seed)
    x, m, z = (2 * randn(*shape, generator=g) for _ in range(3))
    t = torch.randint(0, 1000, (shape[0],), generator=g).to(DEVICE)
    c = COEFFS[variance]
    fast = ops.ddpm_step(layout(x.to(dtype), kind), layout(m.to(dtype), kind), t, c, layout(z.to(dtype), kind),
                         clip, backend="triton")
    assert fast.dtype == dtype and fast.shape == x.shape
    if kind == "channels_last":
        assert fast.is_contiguous(memory_format=torch.channels_last)
    assert_close_by_dtype(fast, lambda a, b, n: reference.ddpm_step(a, b, t, c, n, clip), (x, m, z), dtype)


@settings(max_examples=20, deadline=None)
@given(shape=shapes, dtype=dtypes, kind=layouts, seed=st.integers(0, 2**31))
def test_q_sample_matches_reference(shape, dtype, kind, seed):
    g = torch.Generator().manual_seed(seed)
    x0, z = randn(*shape, generator=g), randn(*shape, generator=g)
    t = torch.randint(0, 1000, (shape[0],), generator=g).to(DEVICE)
    fast, noise = ops.q_sample(layout(x0.to(dtype), kind), t, NOISING, layout(z.to(dtype), kind), backend="triton")
    assert torch.equal(noise, layout(z.to(dtype), kind))
    assert_close_by_dtype(fast, lambda a, n: reference.q_sample(a, t, NOISING, n)[0], (x0, z), dtype)


def _check_group_norm_act(n, groups, per_group, hw, dtype, kind, with_temb, with_affine, silu, seed):
    g = torch.Generator().manual_seed(seed)
    C = groups * per_group
    x = 3 * randn(n, C, *hw, generator=g) + 1
    temb = randn(n, C, generator=g) if with_temb else None
    w = randn(C, generator=g) if with_affine else None
    b = randn(C, generator=g) if with_affine else None
    act = "silu" if silu else None
    fast = ops.group_norm_act(layout(x.to(dtype), kind), w, b, groups, 1e-6,
                              temb.to(dtype) if temb is not None else None, act, backend="triton")
    assert fast.dtype == dtype and fast.shape == x.shape

    def ref(xx, *_):  # in a low dtype, as eager code runs it: parameters in that dtype too
        low = [v.to(xx.dtype) if v is not None else None for v in (w, b, temb)]
        return reference.group_norm_act(xx, low[0], low[1], groups, 1e-6, low[2], act)

    assert_close_by_dtype(fast, ref, (x,), dtype, rtol=1e-4, atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 3), groups=st.sampled_from([1, 2, 4, 8]), per_group=st.integers(1, 5),
       hw=st.tuples(st.integers(1, 9), st.integers(1, 9)), dtype=dtypes, kind=layouts,
       with_temb=st.booleans(), with_affine=st.booleans(), silu=st.booleans(), seed=st.integers(0, 2**31))
def test_group_norm_act_one_pass_matches_reference(n, groups, per_group, hw, dtype, kind, with_temb,
                                                   with_affine, silu, seed):
    assume(per_group * hw[0] * hw[1] > 1)
    _check_group_norm_act(n, groups, per_group, hw, dtype, kind, with_temb, with_affine, silu, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 12, 37, 29), (1, 64, 33, 17)])
def test_group_norm_act_split_reduction_matches_reference(monkeypatch, shape, kind, dtype):
    """Groups too large for one program: chunked statistics merged across programs."""
    from fastddpm.ops.triton import group_norm_act_op as gn_module

    monkeypatch.setattr(gn_module, "ONEPASS_MAX", 256)
    n, C, H, W = shape
    _check_group_norm_act(n, 4, C // 4, (H, W), dtype, kind, True, True, True, seed=n * C + H)


def test_group_norm_act_large_offset_is_accurate():
    """Statistics of values far from zero (mean 1000, std 1): no catastrophic cancellation."""
    x = torch.randn(2, 8, 40, 40, generator=torch.Generator().manual_seed(4)).to(DEVICE) + 1000
    exact = reference.group_norm_act(x.double(), None, None, 2, 1e-6).float()
    torch.testing.assert_close(ops.group_norm_act(x, None, None, 2, 1e-6, backend="triton"), exact,
                               rtol=1e-3, atol=1e-3)


def test_group_norm_act_gradients_match_reference():
    g = torch.Generator().manual_seed(1)
    args = [randn(3, 8, 5, 4, generator=g), randn(8, generator=g), randn(8, generator=g), randn(3, 8, generator=g)]
    grads = []
    for backend in ("reference", "triton"):
        leaves = [a.clone().requires_grad_() for a in args]
        ops.group_norm_act(leaves[0], leaves[1], leaves[2], 4, 1e-6, leaves[3], backend=backend).square().sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ in-kernel noise
def test_in_kernel_noise_is_the_philox_stream():
    """The same stream as the native kernels and the Python oracle (same bits under the interpreter;
    on a GPU within float32 rounding, as the compiler may contract a * b + c)."""
    state = PhiloxState(99, device=DEVICE, offset=5)
    _, z = ops.q_sample(torch.zeros(1, 10001, device=DEVICE), torch.tensor([0], device=DEVICE), NOISING,
                        rng=state, backend="triton")
    assert state.tensor.tolist() == [99, 6]
    expected = philox_normal(10001, 99, 5)
    if GPU:
        torch.testing.assert_close(z.flatten().cpu(), expected, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(z.flatten(), expected)


def test_in_kernel_noise_is_standard_normal():
    state = PhiloxState(2024, device=DEVICE)
    n = 1 << 18
    _, z = ops.q_sample(torch.zeros(1, n, device=DEVICE), torch.tensor([0], device=DEVICE), NOISING, rng=state,
                        backend="triton")
    z = z.flatten().double().cpu()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs((z[1:] * z[:-1]).mean().item()) < 5 / math.sqrt(n)


def test_ddpm_step_in_kernel_noise_advances_and_matches_reference():
    x, m = torch.randn(2, 3, 4, 4, device=DEVICE), torch.randn(2, 3, 4, 4, device=DEVICE)
    c, t = COEFFS["fixed_large"], torch.tensor([500, 900], device=DEVICE)
    state = PhiloxState(5, device=DEVICE)
    first = ops.ddpm_step(x, m, t, c, rng=state, backend="triton")
    second = ops.ddpm_step(x, m, t, c, rng=state, backend="triton")
    assert state.tensor.tolist() == [5, 2] and not torch.equal(first, second)
    expected = reference.ddpm_step(x, m, t, c, philox_normal(x.numel(), 5, 1, device=DEVICE).reshape(x.shape))
    torch.testing.assert_close(second, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_ddpm_step_out_in_place(kind):
    x, m, z = (layout(torch.randn(2, 3, 4, 5, device=DEVICE), kind) for _ in range(3))
    t, c = torch.tensor([3, 700], device=DEVICE), COEFFS["fixed_large"]
    expected = reference.ddpm_step(x, m, t, c, z, 1.0)
    assert ops.ddpm_step(x, m, t, c, z, 1.0, out=x, backend="triton") is x
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 4, 3, 3, device=DEVICE)
    if not GPU:  # the range of t is checked where reading it costs no host sync
        with pytest.raises(ValueError, match=r"t: expected timesteps in \[0, 1000\)"):
            ops.ddpm_step(x, x, torch.tensor([1, 1000]), COEFFS["fixed_large"], x, backend="triton")
    with pytest.raises(ValueError, match="model_out: expected dtype torch.float32"):
        ops.ddpm_step(x, x.half(), torch.tensor([1, 2], device=DEVICE), COEFFS["fixed_large"], x, backend="triton")
    with pytest.raises(ValueError, match="groups: expected a positive divisor of C=4, got 3"):
        ops.group_norm_act(x, None, None, 3, backend="triton")


# ------------------------------------------------------------------------- GPU only: compile, graphs
@needs_gpu
def test_opcheck():
    x = torch.randn(2, 8, 5, 3, device=DEVICE)
    t = torch.tensor([3, 999], device=DEVICE)
    cases = [
        (torch.ops.fastddpm_triton.ddpm_step.default, (x, x.clone(), t, COEFFS["fixed_large"], x.clone(), None, 1.0)),
        (torch.ops.fastddpm_triton.q_sample.default, (x, t, NOISING, None, torch.tensor([1, 0], device=DEVICE))),
        (torch.ops.fastddpm_triton.group_norm_act.default, (x.clone().requires_grad_(), torch.randn(8, device=DEVICE),
                                                            None, 4, 1e-6, torch.randn(2, 8, device=DEVICE), True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@needs_gpu
def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()

    def f(x, m, temb, t, z):
        h = ops.group_norm_act(x, None, None, 4, 1e-6, temb, backend="triton")
        xt, _ = ops.q_sample(h, t, NOISING, z, backend="triton")
        return ops.ddpm_step(xt, m, t, COEFFS["fixed_large"], z, 1.0, backend="triton")

    args = (torch.randn(2, 8, 6, 6, device=DEVICE), torch.randn(2, 8, 6, 6, device=DEVICE),
            torch.randn(2, 8, device=DEVICE), torch.tensor([10, 500], device=DEVICE),
            torch.randn(2, 8, 6, 6, device=DEVICE))
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(*args), f(*args), rtol=1e-5, atol=1e-5)


@needs_gpu
def test_cuda_graph_replays_draw_fresh_noise():
    x, m = torch.randn(2, 3, 8, 8, device=DEVICE), torch.randn(2, 3, 8, 8, device=DEVICE)
    t, c = torch.tensor([500, 900], device=DEVICE), COEFFS["fixed_large"]
    state = PhiloxState(3, device=DEVICE)
    out = torch.empty_like(x)
    ops.ddpm_step(x, m, t, c, rng=state, out=out, backend="triton")  # warm-up: compile and tune
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.ddpm_step(x, m, t, c, rng=state, out=out, backend="triton")
    draws = []
    for _ in range(3):
        graph.replay()
        draws.append(out.clone())
    assert state.tensor.tolist()[1] == 4  # the warm-up and three replays (capture records, runs nothing)
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
