"""The public ops raise only their documented exceptions for bad arguments (fastddpm.ops docstring):
TypeError (not of an accepted Python type) or ValueError (a wrong dtype, shape, device, layout or
range), whose message starts with the argument's name; on every backend, and from the native
kernels' own checks. A table of explicit bad calls, then hypothesis over the argument space."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastddpm import Schedule, ops
from fastddpm.ops import PhiloxState, native, philox_normal, reference, winograd
from fastddpm.ops import triton as triton_backend

CPU = torch.device("cpu")
# The backends that take CPU tensors here: Triton only under TRITON_INTERPRET=1 (conftest.py sets it
# without a GPU).
BACKENDS = [b for b in ops.available_backends() if ops.BACKENDS[b].runs_on(CPU)]
SCHED = Schedule.linear()
COEFFS = SCHED.table("step", "cpu", sampler="ddpm", variance="fixed_large")
NOISING = SCHED.table("noising", "cpu")
T = COEFFS.shape[0]


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)


X = _x(2, 4, 3, 3)
TS = torch.tensor([3, 700])
META = torch.device("meta")  # another device than the CPU, on any machine


def _q_sample(x0=X, t=TS, table=NOISING, noise=X, **kw):
    return lambda backend: ops.q_sample(x0, t, table, noise, backend=backend, **kw)


def _step(x=X, model_out=X, t=TS, coeffs=COEFFS, noise=X, clip=None, **kw):
    return lambda backend: ops.ddpm_step(x, model_out, t, coeffs, noise, clip, backend=backend, **kw)


def _gn(x=X, weight=None, bias=None, groups=2, eps=1e-6, temb=None, act="silu"):
    return lambda backend: ops.group_norm_act(x, weight, bias, groups, eps, temb, act, backend=backend)


# (id, call(backend), exception class, the argument its message starts with)
BAD_CALLS = [
    ("q_sample x0 numpy", _q_sample(x0=X.numpy()), TypeError, "x0"),
    ("q_sample x0 list", _q_sample(x0=[1.0, 2.0]), TypeError, "x0"),
    ("q_sample x0 0-dim", _q_sample(x0=torch.tensor(1.0), t=TS[:1], noise=None), ValueError, "x0"),
    ("q_sample x0 empty batch", _q_sample(x0=X[:0], t=TS[:0], noise=None), ValueError, "x0"),
    ("q_sample x0 int64", _q_sample(x0=X.long(), noise=None), ValueError, "x0"),
    ("q_sample x0 bool", _q_sample(x0=X > 0, noise=None), ValueError, "x0"),
    ("q_sample t numpy", _q_sample(t=TS.numpy()), TypeError, "t"),
    ("q_sample t int32", _q_sample(t=TS.int()), ValueError, "t"),
    ("q_sample t float", _q_sample(t=TS.float()), ValueError, "t"),
    ("q_sample t 0-dim", _q_sample(t=TS[0]), ValueError, "t"),
    ("q_sample t wrong length", _q_sample(t=torch.tensor([1, 2, 3])), ValueError, "t"),
    ("q_sample t on meta", _q_sample(t=TS.to(META)), ValueError, "t"),
    ("q_sample t >= T", _q_sample(t=torch.tensor([1, T])), ValueError, "t"),
    ("q_sample t negative", _q_sample(t=torch.tensor([-1, 3])), ValueError, "t"),
    ("q_sample table numpy", _q_sample(table=NOISING.numpy()), TypeError, "table"),
    ("q_sample table 1-dim", _q_sample(table=NOISING[:, 0]), ValueError, "table"),
    ("q_sample table wrong cols", _q_sample(table=COEFFS), ValueError, "table"),
    ("q_sample table float64", _q_sample(table=NOISING.double()), ValueError, "table"),
    ("q_sample table non-contiguous", _q_sample(table=NOISING.t().contiguous().t()), ValueError, "table"),
    ("q_sample table no rows", _q_sample(table=NOISING[:0]), ValueError, "table"),
    ("q_sample table on meta", _q_sample(table=NOISING.to(META)), ValueError, "table"),
    ("q_sample noise numpy", _q_sample(noise=X.numpy()), TypeError, "noise"),
    ("q_sample noise shape", _q_sample(noise=X[:, :2]), ValueError, "noise"),
    ("q_sample noise dtype", _q_sample(noise=X.double()), ValueError, "noise"),
    ("q_sample noise on meta", _q_sample(noise=X.to(META)), ValueError, "noise"),
    ("q_sample noise and rng", _q_sample(rng=PhiloxState(1)), ValueError, "noise / generator / rng"),
    ("q_sample generator", _q_sample(noise=None, generator=1), TypeError, "generator"),
    ("q_sample generator's device", _q_sample(x0=X.to(META), t=TS.to(META), table=NOISING.to(META), noise=None,
                                               generator=torch.Generator()), ValueError, "generator"),
    ("q_sample rng", _q_sample(noise=None, rng=(1, 2)), TypeError, "rng"),
    ("q_sample rng on meta", _q_sample(noise=None, rng=PhiloxState(1, device=META)), ValueError, "rng"),
    ("q_sample backend unknown", lambda b: ops.q_sample(X, TS, NOISING, X, backend="nope"), ValueError, "backend"),
    ("q_sample backend int", lambda b: ops.q_sample(X, TS, NOISING, X, backend=3), TypeError, "backend"),
    ("q_sample backend list", lambda b: ops.q_sample(X, TS, NOISING, X, backend=["native"]), TypeError, "backend"),
    ("ddpm_step x numpy", _step(x=X.numpy()), TypeError, "x"),
    ("ddpm_step x 0-dim", _step(x=torch.tensor(1.0), t=TS[:1]), ValueError, "x"),
    ("ddpm_step x empty batch", _step(x=X[:0], model_out=X[:0], t=TS[:0], noise=X[:0]), ValueError, "x"),
    ("ddpm_step x int64", _step(x=X.long()), ValueError, "x"),
    ("ddpm_step model_out numpy", _step(model_out=X.numpy()), TypeError, "model_out"),
    ("ddpm_step model_out None", _step(model_out=None), TypeError, "model_out"),
    ("ddpm_step model_out shape", _step(model_out=X[:1]), ValueError, "model_out"),
    ("ddpm_step model_out dtype", _step(model_out=X.half()), ValueError, "model_out"),
    ("ddpm_step model_out on meta", _step(model_out=X.to(META)), ValueError, "model_out"),
    ("ddpm_step coeffs wrong cols", _step(coeffs=NOISING), ValueError, "coeffs"),
    ("ddpm_step coeffs int", _step(coeffs=COEFFS.long()), ValueError, "coeffs"),
    ("ddpm_step t >= T", _step(t=torch.tensor([T, 1])), ValueError, "t"),
    ("ddpm_step clip 0", _step(clip=0.0), ValueError, "clip"),
    ("ddpm_step clip negative", _step(clip=-1), ValueError, "clip"),
    ("ddpm_step clip nan", _step(clip=math.nan), ValueError, "clip"),
    ("ddpm_step clip str", _step(clip="1"), TypeError, "clip"),
    ("ddpm_step clip bool", _step(clip=True), TypeError, "clip"),
    ("ddpm_step clip tensor", _step(clip=torch.tensor(1.0)), TypeError, "clip"),
    ("ddpm_step out numpy", _step(out=X.numpy()), TypeError, "out"),
    ("ddpm_step out shape", _step(out=torch.empty(2, 4, 3)), ValueError, "out"),
    ("ddpm_step out dtype", _step(out=torch.empty(2, 4, 3, 3, dtype=torch.float64)), ValueError, "out"),
    ("ddpm_step out expanded", _step(out=torch.empty(1, 4, 3, 3).expand(2, 4, 3, 3)), ValueError, "out"),
    ("group_norm_act x numpy", _gn(x=X.numpy()), TypeError, "x"),
    ("group_norm_act x 0-dim", _gn(x=torch.tensor(1.0)), ValueError, "x"),
    ("group_norm_act x 2-dim", _gn(x=_x(2, 4)), ValueError, "x"),
    ("group_norm_act x int64", _gn(x=X.long()), ValueError, "x"),
    ("group_norm_act x no channels", _gn(x=_x(2, 0, 3, 3)), ValueError, "x"),
    ("group_norm_act x empty spatial", _gn(x=_x(2, 4, 0, 3)), ValueError, "x"),
    ("group_norm_act groups not a divisor", _gn(groups=3), ValueError, "groups"),
    ("group_norm_act groups 0", _gn(groups=0), ValueError, "groups"),
    ("group_norm_act groups bool", _gn(groups=True), TypeError, "groups"),
    ("group_norm_act groups float", _gn(groups=2.0), TypeError, "groups"),
    ("group_norm_act groups of one value", _gn(x=_x(2, 4, 1, 1), groups=4), ValueError, "groups"),
    ("group_norm_act eps 0", _gn(eps=0.0), ValueError, "eps"),
    ("group_norm_act eps negative", _gn(eps=-1e-5), ValueError, "eps"),
    ("group_norm_act eps nan", _gn(eps=math.nan), ValueError, "eps"),
    ("group_norm_act eps inf", _gn(eps=math.inf), ValueError, "eps"),
    ("group_norm_act eps None", _gn(eps=None), TypeError, "eps"),
    ("group_norm_act eps str", _gn(eps="1e-6"), TypeError, "eps"),
    ("group_norm_act weight numpy", _gn(weight=np.ones(4, np.float32)), TypeError, "weight"),
    ("group_norm_act weight shape", _gn(weight=torch.ones(3)), ValueError, "weight"),
    ("group_norm_act weight int", _gn(weight=torch.ones(4, dtype=torch.int64)), ValueError, "weight"),
    ("group_norm_act weight on meta", _gn(weight=torch.ones(4, device=META)), ValueError, "weight"),
    ("group_norm_act bias shape", _gn(bias=torch.ones(4, 1)), ValueError, "bias"),
    ("group_norm_act temb shape", _gn(temb=torch.ones(2, 3)), ValueError, "temb"),
    ("group_norm_act temb bool", _gn(temb=torch.ones(2, 4, dtype=torch.bool)), ValueError, "temb"),
    ("group_norm_act temb on meta", _gn(temb=torch.ones(2, 4, device=META)), ValueError, "temb"),
    ("group_norm_act act", _gn(act="relu"), ValueError, "act"),
    ("group_norm_act act non-str", _gn(act=1), ValueError, "act"),
    ("group_norm_act backend unknown", lambda b: ops.group_norm_act(X, None, None, 2, backend="cuda"),
     ValueError, "backend"),
]


def _check_raises(call, exc, name):
    with pytest.raises(Exception) as info:
        call()
    # exactly the documented class (a RuntimeError or IndexError would also fail here), named first
    assert type(info.value) is exc, f"{type(info.value).__name__}: {info.value}"
    assert str(info.value).startswith(f"{name}: "), str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_argument_raises_the_documented_exception(case, backend):
    _, call, exc, name = case
    _check_raises(lambda: call(backend), exc, name)


def test_type_errors_name_the_type_that_was_given():
    with pytest.raises(TypeError, match=r"^x: expected a torch\.Tensor, got numpy\.ndarray$"):
        ops.ddpm_step(X.numpy(), X, TS, COEFFS, X)
    with pytest.raises(TypeError, match=r"^groups: expected an int, got bool$"):
        ops.group_norm_act(X, None, None, True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_backend_without_kernels_for_the_device_says_so(backend):
    if ops.BACKENDS[backend].runs_on(META):
        pytest.skip(f"{backend} runs on meta tensors")
    _check_raises(lambda: ops.group_norm_act(X.to(META), None, None, 2, backend=backend), ValueError, "backend")


BAD_OTHER = [
    ("PhiloxState seed negative", lambda: PhiloxState(-1), ValueError, "seed"),
    ("PhiloxState seed too large", lambda: PhiloxState(2**63), ValueError, "seed"),
    ("PhiloxState seed float", lambda: PhiloxState(1.5), TypeError, "seed"),
    ("PhiloxState seed str", lambda: PhiloxState("1"), TypeError, "seed"),
    ("PhiloxState offset negative", lambda: PhiloxState(1, offset=-1), ValueError, "offset"),
    ("PhiloxState offset None", lambda: PhiloxState(1, offset=None), TypeError, "offset"),
    ("PhiloxState device unknown", lambda: PhiloxState(1, device="gpu7"), ValueError, "device"),
    ("PhiloxState device int list", lambda: PhiloxState(1, device=[0]), TypeError, "device"),
    ("philox_normal numel negative", lambda: philox_normal(-1, 0, 0), ValueError, "numel"),
    ("philox_normal numel float", lambda: philox_normal(4.0, 0, 0), TypeError, "numel"),
    ("philox_normal seed negative", lambda: philox_normal(4, -1, 0), ValueError, "seed"),
    ("philox_normal offset too large", lambda: philox_normal(4, 0, 2**64), ValueError, "offset"),
    ("philox_normal device", lambda: philox_normal(4, 0, 0, device="nope"), ValueError, "device"),
]


@pytest.mark.parametrize("case", BAD_OTHER, ids=[c[0] for c in BAD_OTHER])
def test_bad_noise_arguments_raise_the_documented_exception(case):
    _, call, exc, name = case
    _check_raises(call, exc, name)


needs_winograd = pytest.mark.skipif(not winograd.available(), reason="the native Winograd kernel is not built")
U = winograd.transform_weight(torch.randn(6, 4, 3, 3))
BAD_WINOGRAD = [
    ("x numpy", lambda: ops.winograd_conv3x3(X.numpy(), U), TypeError, "x"),
    ("x float64", lambda: ops.winograd_conv3x3(X.double(), U), ValueError, "x"),
    ("x 3-dim", lambda: ops.winograd_conv3x3(X[0], U), ValueError, "x"),
    ("U numpy", lambda: ops.winograd_conv3x3(X, U.numpy()), TypeError, "U"),
    ("U channels", lambda: ops.winograd_conv3x3(_x(2, 5, 3, 3), U), ValueError, "U"),
    ("U on meta", lambda: ops.winograd_conv3x3(X, U.to(META)), ValueError, "U"),
    ("bias shape", lambda: ops.winograd_conv3x3(X, U, torch.zeros(5)), ValueError, "bias"),
    ("bias float64", lambda: ops.winograd_conv3x3(X, U, torch.zeros(6, dtype=torch.float64)), ValueError, "bias"),
    ("bias list", lambda: ops.winograd_conv3x3(X, U, [0.0] * 6), TypeError, "bias"),
    ("weight numpy", lambda: winograd.transform_weight(np.zeros((6, 4, 3, 3))), TypeError, "weight"),
]


@needs_winograd
@pytest.mark.parametrize("case", BAD_WINOGRAD, ids=[c[0] for c in BAD_WINOGRAD])
def test_bad_winograd_arguments_raise_the_documented_exception(case):
    _, call, exc, name = case
    _check_raises(call, exc, name)


# ------------------------------------------------------------------ the native kernels' own checks
needs_native = pytest.mark.skipif(not native.AVAILABLE, reason=f"native extension unavailable ({native.ERROR})")
OPS = torch.ops.fastddpm if native.AVAILABLE else None
BAD_NATIVE = [
    ("q_sample t >= T", lambda: OPS.q_sample(X, torch.tensor([1, T]), NOISING, X, None), "t"),
    ("q_sample table no rows", lambda: OPS.q_sample(X, TS, NOISING[:0], X, None), "table"),
    ("q_sample x float8", lambda: OPS.q_sample(X.to(torch.float8_e4m3fn), TS, NOISING, None, PhiloxState(1).tensor),
     "x"),
    ("ddpm_step empty batch", lambda: OPS.ddpm_step(X[:0], X[:0], TS[:0], COEFFS, X[:0], None, None), "x"),
    ("ddpm_step model_out", lambda: OPS.ddpm_step(X, X[:1], TS, COEFFS, X, None, None), "model_out"),
    ("ddpm_step rng_state", lambda: OPS.ddpm_step(X, X, TS, COEFFS, None, None, None), "rng_state"),
    ("ddpm_step clip", lambda: OPS.ddpm_step(X, X, TS, COEFFS, X, None, -1.0), "clip"),
    ("ddpm_step_out layout", lambda: OPS.ddpm_step_out(X, X, TS, COEFFS, X, None, None, X.transpose(-1, -2)),
     "out"),
    ("group_norm_act eps 0", lambda: OPS.group_norm_act(X, None, None, 2, 0.0, None, True), "eps"),
    ("group_norm_act eps nan", lambda: OPS.group_norm_act(X, None, None, 2, math.nan, None, True), "eps"),
    ("group_norm_act weight int", lambda: OPS.group_norm_act(X, torch.ones(4, dtype=torch.int64), None, 2, 1e-6,
                                                             None, True), "weight"),
    ("group_norm_act groups", lambda: OPS.group_norm_act(X, None, None, 3, 1e-6, None, True), "groups"),
    ("winograd U", lambda: OPS.winograd_conv3x3(X, torch.zeros(16, 5, 6), None), "U"),
    ("cpu_memory_pool limit", lambda: OPS.cpu_memory_pool(True, -1), "limit_bytes"),
]


@needs_native
@pytest.mark.parametrize("case", BAD_NATIVE, ids=[c[0] for c in BAD_NATIVE])
def test_native_checks_raise_value_error(case):
    """TORCH_CHECK_VALUE: the C++ argument checks raise ValueError, as the Python ones do."""
    _, call, name = case
    _check_raises(call, ValueError, name)


# ------------------------------------------------------------------ trusted t
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t", [[5, T], [-3, 2], [2**40, -(2**40)]], ids=["T", "negative", "huge"])
def test_trusted_out_of_range_t_is_clamped_or_refused_never_a_crash(backend, t):
    """trusted_t means unchecked: the reference and Triton clamp t into the table (documented
    unspecified values: here the clamped rows), the native CPU kernels check it anyway."""
    t = torch.tensor(t)
    call = lambda: ops.ddpm_step(X, X, t, COEFFS, X, 1.0, backend=backend, trusted_t=True)  # noqa: E731
    if backend == "native":
        _check_raises(call, ValueError, "t")
        return
    expected = reference.ddpm_step(X, X, t.clamp(0, T - 1), COEFFS, X, 1.0)
    torch.testing.assert_close(call(), expected)


# ------------------------------------------------------------------ hypothesis over the argument space
# What a property test may see: a result of the documented shape and dtype, or one of these.
DOCUMENTED = (TypeError, ValueError)
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPES = FLOATS + [torch.int64, torch.bool]
LAYOUTS = ["contiguous", "channels_last", "transposed", "sliced", "expanded"]


@st.composite
def tensors(draw, shape, dtypes=st.sampled_from(FLOATS * 3 + DTYPES), devices=st.sampled_from(["cpu"] * 9 + ["meta"])):
    """A tensor of ``shape`` in a drawn dtype, memory layout and device (meta: another device)."""
    shape, dtype, kind = tuple(shape), draw(dtypes), draw(st.sampled_from(LAYOUTS))
    seed = draw(st.integers(0, 2**16))
    base = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if kind == "channels_last" and len(shape) == 4:
        base = base.contiguous(memory_format=torch.channels_last)
    elif kind == "transposed" and len(shape) >= 2:
        base = base.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif kind == "sliced" and len(shape) >= 1:
        base = torch.randn(*shape[:-1], 2 * shape[-1], generator=torch.Generator().manual_seed(seed))[..., ::2]
    elif kind == "expanded" and len(shape) >= 1:
        base = base[:1].expand(shape) if shape[0] else base
    return base.to(dtype=dtype, device=draw(devices))


def shapes(min_dims=1, max_dims=4):
    """Mostly shapes the ops take ([B, ...] with sizes >= 1); else any of 0 to 4 dims, sizes 0 to 5."""
    good = st.lists(st.integers(1, 5), min_size=min_dims, max_size=max_dims)
    return _mostly_first(good, st.lists(st.integers(0, 5), min_size=0, max_size=4))


def _mostly_first(good, *others):
    """Draws from ``good`` three times in four, else from one of ``others``."""
    return st.sampled_from([good] * 3 * len(others) + list(others)).flatmap(lambda strategy: strategy)


def _mostly(dtype):
    """A dtype strategy: mostly ``dtype`` (that of x, so the call gets further), else any."""
    return st.sampled_from([dtype] * 6 + DTYPES)


# floats and ints of any sign, NaN, inf, None, a bool, a str (one_of draws each branch alike)
scalars = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 3), st.booleans(),
                    st.just("1"))
backends = st.sampled_from(BACKENDS + ["auto"] * 2 + ["nope"])


@st.composite
def timesteps(draw, batch):
    """A t of the right length and dtype mostly, with values in and out of [0, T); else a wrong one."""
    length = draw(st.sampled_from([batch] * 6 + [batch + 1, max(batch - 1, 0)]))
    values = draw(st.lists(st.integers(-3, T + 3), min_size=length, max_size=length))
    t = torch.tensor(values, dtype=torch.int64)
    zero_dim = torch.tensor(values[0] if values else 1)
    return draw(st.sampled_from([t] * 12 + [t.int(), t.float(), zero_dim, t.to(META), t.numpy()]))


@st.composite
def tables(draw, good):
    """The schedule table mostly; else one of wrong columns, dtype, dims, layout, rows or device."""
    return draw(st.sampled_from([good] * 16 + [good[:, :1], good.double(), good[:, 0], good.t().contiguous().t(),
                                              good[:0], good[:3], good.to(META), good.tolist()]))


# The names an error message may start with: the arguments of the ops (and of their noise sources).
ARGUMENTS = {"x", "x0", "t", "table", "coeffs", "noise", "noise / generator / rng", "model_out", "out", "clip",
             "generator", "rng", "backend", "weight", "bias", "temb", "groups", "eps", "act", "U"}


def _assert_documented(call, shape, dtype, outputs=1):
    """call() returns ``outputs`` tensors of ``shape`` and ``dtype`` (``shape`` None: it must
    raise), or raises a documented exception whose message starts with an argument's name;
    anything else fails the test."""
    try:
        result = call()
    except DOCUMENTED as e:
        assert str(e).split(":")[0] in ARGUMENTS, f"{type(e).__name__}: {e}"
        return
    assert shape is not None, f"expected a documented exception, got {result}"
    for r in (result if outputs > 1 else (result,)):
        assert isinstance(r, torch.Tensor) and tuple(r.shape) == tuple(shape) and r.dtype == dtype, r


@settings(max_examples=200, deadline=None)
@given(data=st.data(), x_shape=shapes(), backend=backends)
def test_q_sample_raises_only_documented_exceptions(data, x_shape, backend):
    x0 = data.draw(tensors(x_shape, devices=st.just("cpu")))
    batch = x_shape[0] if x_shape else 1
    t = data.draw(timesteps(batch))
    table = data.draw(tables(NOISING))
    noise = data.draw(st.one_of(st.none(), tensors(x_shape, _mostly(x0.dtype)), tensors(x_shape[:-1])))
    _assert_documented(lambda: ops.q_sample(x0, t, table, noise, backend=backend), x0.shape, x0.dtype, outputs=2)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), x_shape=shapes(), backend=backends, clip=_mostly_first(st.sampled_from([None, 1.0]), scalars),
       trusted_t=st.booleans())
def test_ddpm_step_raises_only_documented_exceptions(data, x_shape, backend, clip, trusted_t):
    x = data.draw(tensors(x_shape, devices=st.just("cpu")))
    batch = x_shape[0] if x_shape else 1
    t = data.draw(timesteps(batch))
    coeffs = data.draw(tables(COEFFS))
    model_out, noise = data.draw(tensors(x_shape, dtypes=_mostly(x.dtype))), None
    if data.draw(st.booleans()):
        noise = data.draw(tensors(x_shape, dtypes=_mostly(x.dtype)))
    out = data.draw(st.one_of(st.none(), tensors(x_shape, dtypes=_mostly(x.dtype))))
    _assert_documented(lambda: ops.ddpm_step(x, model_out, t, coeffs, noise, clip, out=out, backend=backend,
                                             trusted_t=trusted_t), x.shape, x.dtype)


@settings(max_examples=250, deadline=None)
@given(data=st.data(), x_shape=shapes(min_dims=3, max_dims=5), backend=backends,
       eps=_mostly_first(st.sampled_from([1e-6, 1e-5]), scalars),
       act=_mostly_first(st.sampled_from(["silu", None]), st.sampled_from(["relu", 1, "SiLU"])))
def test_group_norm_act_raises_only_documented_exceptions(data, x_shape, backend, eps, act):
    x = data.draw(tensors(x_shape, devices=st.just("cpu")))
    channels = x_shape[1] if len(x_shape) > 1 else 1
    divisors = [g for g in range(1, channels + 1) if channels % g == 0] or [1]
    groups = data.draw(_mostly_first(st.sampled_from(divisors), st.integers(-1, 6), st.booleans(), st.floats(0, 4),
                                     st.none()))
    weight, bias = (data.draw(_mostly_first(st.one_of(st.none(), tensors([channels])), tensors([channels + 1])))
                    for _ in range(2))
    temb = data.draw(_mostly_first(st.one_of(st.none(), tensors(x_shape[:2])), tensors([channels])))
    _assert_documented(lambda: ops.group_norm_act(x, weight, bias, groups, eps, temb, act, backend=backend),
                       x.shape, x.dtype)


@needs_winograd
@settings(max_examples=150, deadline=None)
@given(data=st.data(), x_shape=shapes(min_dims=4), u_shape=shapes(), k=st.integers(0, 4))
def test_winograd_raises_only_documented_exceptions(data, x_shape, u_shape, k):
    x = data.draw(tensors(x_shape, dtypes=st.sampled_from([torch.float32] * 6 + DTYPES), devices=st.just("cpu")))
    channels = x_shape[1] if len(x_shape) > 1 else 1
    U = data.draw(st.one_of(tensors([16, channels, k]), tensors(u_shape)))
    bias = data.draw(st.one_of(st.none(), tensors([k]), tensors([k + 1])))
    expected = (x_shape[0], k, *x_shape[2:]) if len(x_shape) == 4 else None
    _assert_documented(lambda: ops.winograd_conv3x3(x, U, bias), expected, x.dtype)  # output: x's dtype


@settings(max_examples=100, deadline=None)
@given(seed=st.one_of(st.none(), st.integers(-2, 2**64), st.floats(), st.text(max_size=2)),
       offset=st.one_of(st.integers(-2, 2**64), st.floats(), st.none()),
       device=st.sampled_from(["cpu", "meta", torch.device("cpu"), "nope", 0, None]))
def test_philox_state_raises_only_documented_exceptions(seed, offset, device):
    try:
        state = PhiloxState(seed, device=device, offset=offset)
    except DOCUMENTED as e:
        assert str(e).split(":")[0] in ("seed", "offset", "device"), str(e)
        return
    assert state.tensor.dtype == torch.int64 and tuple(state.tensor.shape) == (2,)
