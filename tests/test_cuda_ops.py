"""The CUDA kernels against the reference (skipped cleanly without a GPU; run by
benchmarks/gpu_check.sh on a GPU machine)."""

import pytest
import torch

from fastddpm import Schedule, ops
from fastddpm.ops import PhiloxState, native, philox_normal, reference

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and native.cuda_available()),
                                reason="needs a CUDA GPU and the extension built with CUDA")

SCHED = Schedule.linear()


def _tables():
    return (SCHED.table("step", "cuda", sampler="ddpm", variance="fixed_large"), SCHED.table("noising", "cuda"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_ops_match_reference(dtype, channels_last):
    coeffs, noising = _tables()
    g = torch.Generator("cuda").manual_seed(0)
    shape = (3, 64, 17, 9)
    x, m, z = (torch.randn(shape, generator=g, device="cuda") for _ in range(3))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xl, ml, zl = (v.to(dtype).contiguous(memory_format=fmt) for v in (x, m, z))
    t = torch.tensor([0, 500, 999], device="cuda")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ops.ddpm_step(xl, ml, t, coeffs, zl, 1.0, backend="native").float(),
                               reference.ddpm_step(xl, ml, t, coeffs, zl, 1.0).float(), rtol=tol, atol=tol)
    torch.testing.assert_close(ops.q_sample(xl, t, noising, zl, backend="native")[0].float(),
                               reference.q_sample(xl, t, noising, zl)[0].float(), rtol=tol, atol=tol)
    temb, w, b = torch.randn(3, 64, device="cuda"), torch.randn(64, device="cuda"), torch.randn(64, device="cuda")
    exact = reference.group_norm_act(x, w, b, 32, 1e-6, temb)
    fast = ops.group_norm_act(xl, w, b, 32, 1e-6, temb.to(dtype), backend="native")
    low = reference.group_norm_act(xl, w.to(dtype), b.to(dtype), 32, 1e-6, temb.to(dtype))  # eager in low dtype
    assert (fast.float() - exact).abs().max() <= 2 * (low.float() - exact).abs().max() + 1e-4


def _misaligned(v):
    """v's values at an offset of one element: no 4-value aligned vector access is possible."""
    flat = torch.empty(v.numel() + 1, dtype=v.dtype, device=v.device)[1:]
    return flat.copy_(v.flatten()).view(v.shape)


# per-sample sizes divisible by 4 (vector rows) and not (the flat kernel), misaligned pointers,
# group sizes on both sides of the one-pass limit (8192 values) and at batch 1 (split chunks)
@pytest.mark.parametrize("shape,groups,misalign", [((2, 8, 4, 4), 4, False), ((3, 6, 5, 3), 3, False),
                                                   ((2, 8, 4, 4), 4, True), ((2, 64, 64, 64), 32, False),
                                                   ((2, 32, 64, 65), 16, False), ((1, 64, 128, 128), 8, False),
                                                   ((1, 256, 32, 32), 32, True)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_launch_paths_match_reference(shape, groups, misalign, channels_last):
    coeffs, noising = _tables()
    g = torch.Generator("cuda").manual_seed(1)
    x, m, z = (3 * torch.randn(shape, generator=g, device="cuda") + 1 for _ in range(3))
    if misalign:
        x, m, z = (_misaligned(v) for v in (x, m, z))
    if channels_last:
        x, m, z = (v.contiguous(memory_format=torch.channels_last) for v in (x, m, z))
    t = torch.randint(0, 1000, (shape[0],), generator=g, device="cuda")
    torch.testing.assert_close(ops.ddpm_step(x, m, t, coeffs, z, 1.0, backend="native"),
                               reference.ddpm_step(x, m, t, coeffs, z, 1.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.q_sample(x, t, noising, z, backend="native")[0],
                               reference.q_sample(x, t, noising, z)[0], rtol=1e-5, atol=1e-5)
    C = shape[1]
    temb, w, b = (torch.randn(*s, generator=g, device="cuda") for s in ((shape[0], C), (C,), (C,)))
    torch.testing.assert_close(ops.group_norm_act(x, w, b, groups, 1e-6, temb, backend="native"),
                               reference.group_norm_act(x.double(), w.double(), b.double(), groups, 1e-6,
                                                        temb.double()).float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(1, 10001), (2, 4096)])  # the flat kernel, then the vector rows
def test_cuda_in_kernel_noise_is_the_same_stream_as_the_cpu_one(shape):
    _, noising = _tables()
    state = PhiloxState(11, device="cuda")
    _, z = ops.q_sample(torch.zeros(shape, device="cuda"), torch.zeros(shape[0], dtype=torch.long, device="cuda"),
                        noising, rng=state, backend="native")
    assert state.tensor.tolist() == [11, 1]
    n = shape[0] * shape[1]
    torch.testing.assert_close(z.flatten().cpu(), philox_normal(n, 11, 0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["step", "q_sample", "group_norm_act"])
def test_cuda_opcheck(case):
    coeffs, noising = _tables()
    x = torch.randn(2, 8, 5, 3, device="cuda")
    t = torch.tensor([3, 999], device="cuda")
    if case == "step":
        torch.library.opcheck(torch.ops.fastddpm.ddpm_step.default, (x, x.clone(), t, coeffs, x.clone(), None, 1.0))
    elif case == "q_sample":
        torch.library.opcheck(torch.ops.fastddpm.q_sample.default,
                              (x, t, noising, None, torch.tensor([1, 0], device="cuda")))
    else:
        torch.library.opcheck(torch.ops.fastddpm.group_norm_act.default,
                              (x.requires_grad_(), torch.randn(8, device="cuda"), None, 4, 1e-6,
                               torch.randn(2, 8, device="cuda"), True))


def test_cuda_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    coeffs, noising = _tables()

    def f(x, m, temb, t, z):
        h = ops.group_norm_act(x, None, None, 4, 1e-6, temb, backend="native")
        xt, _ = ops.q_sample(h, t, noising, z, backend="native")
        return ops.ddpm_step(xt, m, t, coeffs, z, 1.0, backend="native")

    args = (torch.randn(2, 8, 6, 6, device="cuda"), torch.randn(2, 8, 6, 6, device="cuda"),
            torch.randn(2, 8, device="cuda"), torch.tensor([10, 500], device="cuda"),
            torch.randn(2, 8, 6, 6, device="cuda"))
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(*args), f(*args), rtol=1e-5, atol=1e-5)


def test_cuda_graph_replays_draw_fresh_noise():
    coeffs, _ = _tables()
    x, m = torch.randn(2, 4, 8, 8, device="cuda"), torch.randn(2, 4, 8, 8, device="cuda")
    t = torch.tensor([500, 900], device="cuda")
    out = torch.empty_like(x)
    state = PhiloxState(3, device="cuda")
    ops.ddpm_step(x, m, t, coeffs, None, 1.0, out=out, rng=state, backend="native")  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.ddpm_step(x, m, t, coeffs, None, 1.0, out=out, rng=state, backend="native")
    results = []
    for _ in range(3):
        graph.replay()
        results.append(out.clone())
    torch.cuda.synchronize()
    assert state.tensor.tolist()[1] == 4  # warm-up + three replays (capture records, runs nothing)
    assert not torch.equal(results[0], results[1]) and not torch.equal(results[1], results[2])


@pytest.mark.skipif("triton" not in ops.available_backends(), reason="needs Triton")
def test_auto_takes_native_eagerly_and_triton_under_graph_capture():
    cuda = torch.device("cuda")
    assert ops.dispatch.implementation("auto", cuda) is ops.BACKENDS["native"]
    x = torch.zeros(8, device="cuda")
    graph, seen = torch.cuda.CUDAGraph(), []
    with torch.cuda.graph(graph):
        seen.append(ops.dispatch.implementation("auto", cuda))
        x.add_(1)
    assert seen == [ops.BACKENDS["triton"]]
