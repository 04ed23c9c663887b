"""group_norm_act's fused backward (csrc on the CPU; Triton, interpreted on the CPU) against
torch.autograd through the reference op in float64, and against the Python formula
(fastddpm/ops/autograd.py: group_norm_act_backward), on random shapes, dtypes and layouts."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastddpm import ops
from fastddpm.ops import native, reference
from fastddpm.ops import triton as triton_backend
from fastddpm.ops.autograd import group_norm_act_backward
from oracle import layout

BACKENDS = [b for b, ok in (("native", native.AVAILABLE), ("triton", triton_backend.runs_on(torch.device("cpu"))))
            if ok]
pytestmark = pytest.mark.skipif(not BACKENDS, reason="neither the native extension nor Triton is available")
needs_native = pytest.mark.skipif(not native.AVAILABLE, reason=f"native extension unavailable ({native.ERROR})")
NAMESPACE = {"native": "fastddpm", "triton": "fastddpm_triton"}


@st.composite
def cases(draw):
    """(shape, groups): odd sizes, 1 group, C == groups, groups dividing C; each group > 1 value."""
    groups = draw(st.sampled_from([1, 2, 3, 4]))
    C = groups * draw(st.integers(1, 3))
    H, W = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    if C // groups * H * W < 2:
        W += 1
    return (draw(st.integers(1, 3)), C, H, W), groups


def _inputs(shape, seed, has_w, has_b, has_t):
    g = torch.Generator().manual_seed(seed)
    N, C = shape[:2]
    x = 1.5 * torch.randn(shape, generator=g, dtype=torch.float64) + 0.3
    w = 1 + 0.5 * torch.randn(C, generator=g, dtype=torch.float64) if has_w else None
    b = 0.5 * torch.randn(C, generator=g, dtype=torch.float64) if has_b else None
    t = torch.randn(N, C, generator=g, dtype=torch.float64) if has_t else None
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    return x, w, b, t, grad


def _autograd64(x, w, b, t, grad, groups, silu):
    """The float64 gradients of the reference op by torch.autograd: the oracle."""
    leaves = [v.detach().clone().requires_grad_(True) if v is not None else None for v in (x, w, b, t)]
    y = reference.group_norm_act(leaves[0], leaves[1], leaves[2], groups, 1e-6, leaves[3], "silu" if silu else None)
    y.backward(grad)
    return [v.grad if v is not None else None for v in leaves]


def _fused(backend, x, w, b, t, grad, groups, silu):
    """The backend's gradients through autograd (its registered fused backward)."""
    leaves = [v.detach().clone().requires_grad_(True) if v is not None else None for v in (x, w, b, t)]
    y = ops.group_norm_act(leaves[0], leaves[1], leaves[2], groups, 1e-6, leaves[3], "silu" if silu else None,
                           backend=backend)
    y.backward(grad)
    return [v.grad if v is not None else None for v in leaves]


def _condition(x, t, grad, groups):
    """The size of gx's rounding: rstd x |grad|. gx = rstd (g - mean g - xhat mean(g xhat)) cancels
    (exactly, for a group of two values), so its float32 error grows with rstd, which is large for a
    group of nearly equal values, not with gx's own size."""
    h = x + t.reshape(*t.shape, *([1] * (x.dim() - 2))) if t is not None else x
    var = h.double().reshape(x.shape[0], groups, -1).var(-1, unbiased=False)
    return (var + 1e-6).rsqrt().max().item() * grad.double().abs().max().item()


def _tolerance(dtype, exact, condition=0.0):
    """fp32: rtol 1e-4 (reductions) scaled to the gradient's size or its rounding's (``condition``:
    :func:`_condition`). bf16: x, grad and gx are stored in bf16 (8 bits of mantissa), so the float64
    oracle differs by their rounding: 2^-8 relative to the largest value, times a small factor for
    the sums of rounded products (the weight and bias gradients are sums over the batch of such
    products, computed in float32)."""
    scale = max(1.0, exact.abs().max().item(), condition)
    return (1e-4 * scale, 1e-4) if dtype == torch.float32 else (0.05 * scale, 0.02)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=30, deadline=None)
@given(case=cases(), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       kind=st.sampled_from(["contiguous", "channels_last", "strided"]), silu=st.booleans(),
       has_w=st.booleans(), has_b=st.booleans(), has_t=st.booleans(), seed=st.integers(0, 2**31))
def test_fused_backward_matches_float64_autograd(backend, case, dtype, kind, silu, has_w, has_b, has_t, seed):
    shape, groups = case
    x, w, b, t, grad = _inputs(shape, seed, has_w, has_b, has_t)
    # the low-precision run sees the rounded inputs; the oracle sees the same rounded values in float64
    xl, gl = layout(x.to(dtype), kind), layout(grad.to(dtype), kind)
    wl, bl, tl = (v.float() if v is not None else None for v in (w, b, t))
    exact = _autograd64(xl.double(), w, b, t, gl.double(), groups, silu)
    fast = _fused(backend, xl, wl, bl, tl, gl, groups, silu)
    for name, f, e in zip(("x", "weight", "bias", "temb"), fast, exact):
        if e is None:
            assert f is None, name
            continue
        atol, rtol = _tolerance(dtype, e, _condition(xl, t, gl, groups) if name == "x" else 0.0)
        assert f.shape == e.shape, name
        torch.testing.assert_close(f.double(), e, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")
    if kind == "channels_last" and len(shape) == 4:
        assert fast[0].is_contiguous(memory_format=torch.channels_last) or fast[0].is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=20, deadline=None)
@given(case=cases(), kind=st.sampled_from(["contiguous", "channels_last", "strided"]), silu=st.booleans(),
       has_w=st.booleans(), has_t=st.booleans(), seed=st.integers(0, 2**31))
def test_fused_backward_matches_the_formula(backend, case, kind, silu, has_w, has_t, seed):
    shape, groups = case
    x, w, b, t, grad = _inputs(shape, seed, has_w, has_w, has_t)
    x, grad = layout(x.float(), kind), layout(grad.float(), kind)
    w, b, t = (v.float() if v is not None else None for v in (w, b, t))
    op = getattr(torch.ops, NAMESPACE[backend])
    _, mean, rstd = op.group_norm_act(x, w, b, groups, 1e-6, t, silu)
    formula = group_norm_act_backward(grad, x, w, b, t, mean, rstd, groups, silu)
    kernel = op.group_norm_act_backward(grad, x, w, b, t, mean, rstd, groups, silu)
    for f, k in zip(formula, kernel):
        if f is None:
            assert k.numel() == 0
        else:
            torch.testing.assert_close(k, f, rtol=1e-4, atol=1e-5)


@needs_native
def test_native_backward_in_float64_passes_gradcheck():
    """Finite differences of the native op itself (its float64 kernels) on one small case."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 3, 5, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    t = torch.randn(2, 6, generator=g, dtype=torch.float64)
    args = [v.requires_grad_(True) for v in (x, w, b, t)]
    for x_ in (args[0], args[0].detach().contiguous().requires_grad_(True)):
        assert torch.autograd.gradcheck(
            lambda a, c, d, e: ops.group_norm_act(a, c, d, 3, 1e-6, e, "silu", backend="native"),
            (x_, args[1], args[2], args[3]), eps=1e-6, atol=1e-6)


@needs_native
def test_double_backward_is_refused_clearly_and_the_reference_gives_it():
    """create_graph=True: the fused ops have no second derivatives (the saved statistics are
    constants to them), so they say so; the reference (aten's group norm) passes gradgradcheck."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    y = ops.group_norm_act(x, w, None, 2, 1e-6, None, "silu", backend="native")
    with pytest.raises(NotImplementedError, match="use_backend"):
        torch.autograd.grad(y.sum(), x, create_graph=True)
    assert torch.autograd.gradgradcheck(
        lambda a, c: ops.group_norm_act(a, c, None, 2, 1e-6, None, "silu", backend="reference"), (x, w), eps=1e-6,
        atol=1e-5)


@needs_native
def test_native_backward_rejects_bad_statistics():
    x = torch.randn(2, 4, 3, 3)
    _, mean, rstd = torch.ops.fastddpm.group_norm_act(x, None, None, 2, 1e-6, None, True)
    with pytest.raises(ValueError, match="mean"):
        torch.ops.fastddpm.group_norm_act_backward(x, x, None, None, None, mean[:, :1], rstd, 2, True)
    with pytest.raises(ValueError, match="grad"):
        torch.ops.fastddpm.group_norm_act_backward(x[:1], x, None, None, None, mean, rstd, 2, True)


@needs_native
def test_native_backward_opcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 4, 4, generator=g).contiguous(memory_format=torch.channels_last)
    w, b, t = torch.randn(8, generator=g), torch.randn(8, generator=g), torch.randn(2, 8, generator=g)
    _, mean, rstd = torch.ops.fastddpm.group_norm_act(x, w, b, 4, 1e-6, t, True)
    for args in ((torch.randn_like(x), x, w, b, t, mean, rstd, 4, True),
                 (torch.randn_like(x), x, None, None, None, mean, rstd, 4, False)):
        torch.library.opcheck(torch.ops.fastddpm.group_norm_act_backward.default, args)


@needs_native
def test_auto_picks_the_native_op_for_cpu_training(monkeypatch):
    calls = []
    real = native.group_norm_act
    monkeypatch.setattr(native, "group_norm_act", lambda *a, **k: calls.append(1) or real(*a, **k))
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 4, 3, 3, dtype=dtype, requires_grad=True)
        ops.group_norm_act(x, None, None, 2).sum().backward()
    assert len(calls) == 2


@needs_native
@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_compiled_forward_and_backward_match_eager(kind):
    g = torch.Generator().manual_seed(0)
    x0 = layout(torch.randn(2, 8, 5, 5, generator=g), kind)
    w0, b0, t0 = torch.randn(8, generator=g), torch.randn(8, generator=g), torch.randn(2, 8, generator=g)
    grad = layout(torch.randn(2, 8, 5, 5, generator=g), kind)

    def f(x, w, b, t):
        return ops.group_norm_act(x, w, b, 4, 1e-6, t, "silu", backend="native") * 2.0

    results = []
    for fn in (f, torch.compile(f, fullgraph=True, dynamic=False)):
        leaves = [v.detach().clone().requires_grad_(True) for v in (x0, w0, b0, t0)]
        fn(*leaves).backward(grad)
        results.append([v.grad for v in leaves])
    for e, c in zip(*results):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
