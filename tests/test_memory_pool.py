"""The caching CPU allocator (fastddpm.ops.cpu_memory_pool): reuse, scoping, limits, and that a
loop inside it stops paying page faults."""

import os
import resource

import pytest
import torch

from fastddpm import Sampler, Schedule, UNet
from fastddpm.ops import cpu_memory_pool, memory_pool

pytestmark = pytest.mark.skipif(not memory_pool.available(), reason="native extension not built")

BIG = 1 << 20  # floats: a 4 MiB block, served by mmap outside the pool


def test_freed_blocks_are_reused_for_the_same_size():
    with cpu_memory_pool():
        a = torch.empty(BIG)
        ptr = a.data_ptr()
        del a
        assert memory_pool.stats()["cached_bytes"] == 4 * BIG
        b = torch.ones(BIG)
        assert b.data_ptr() == ptr
        assert memory_pool.stats()["hits"] == 1
        assert b.sum().item() == BIG  # the reused block holds what was written, nothing stale
        c = torch.empty(BIG + 1)  # another size never takes that block
        assert c.data_ptr() != ptr


def test_exit_restores_the_allocator_and_frees_the_cache():
    with cpu_memory_pool():
        kept = torch.full((BIG,), 3.0)  # outlives the pool
        torch.empty(BIG)  # allocated and freed at once: cached
    s = memory_pool.stats()
    assert s["enabled"] == 0 and s["cached_bytes"] == 0
    assert kept.sum().item() == 3.0 * BIG
    ptr = kept.data_ptr()
    del kept  # freed normally by the pool's deleter after the pool is gone
    assert memory_pool.stats()["cached_bytes"] == 0
    x = torch.empty(BIG)
    del x
    assert memory_pool.stats()["cached_bytes"] == 0 and ptr  # outside the pool nothing is cached


def test_nested_pools_share_one_scope():
    with cpu_memory_pool():
        with cpu_memory_pool():
            torch.empty(BIG)  # allocated and freed at once: cached
        assert memory_pool.stats()["enabled"] == 1 and memory_pool.stats()["cached_bytes"] == 4 * BIG
    assert memory_pool.stats()["enabled"] == 0


def test_limit_bounds_the_cache():
    with cpu_memory_pool(limit_bytes=6 * BIG):
        a, b = torch.empty(BIG), torch.empty(BIG)
        del a, b  # 8 MiB freed, 6 MiB allowed: one block kept
        assert memory_pool.stats()["cached_bytes"] == 4 * BIG


def test_small_blocks_and_empty_tensors_pass_through():
    with cpu_memory_pool():
        small = torch.ones(100)
        empty = torch.empty(0)
        del small, empty
        assert memory_pool.stats()["cached_bytes"] == 0


def test_bad_limit_is_a_clear_error():
    with pytest.raises(ValueError, match="limit_bytes"):
        with cpu_memory_pool(limit_bytes=-1):
            pass


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="page-fault counts need Linux")
def test_sampler_steps_after_the_first_map_no_new_memory():
    """Inside the pool every step after the first reuses the blocks the first one freed: the
    process takes (almost) no page faults from then on; the result is that of the unpooled loop."""
    torch.manual_seed(0)
    model = UNet(in_channels=1, out_channels=1, resolution=16, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                 attn_resolutions=(8,), groups=8).eval()
    schedule = Schedule.linear().respaced(12)
    coeffs = schedule.table("step", "cpu", sampler="ddpm", variance="fixed_large")
    shape = (8, 1, 16, 16)  # activations of 256 KiB: pooled blocks
    outputs = {}
    for pooled in (False, True):
        faults = []
        sampler = Sampler(model, schedule, coeffs, shape, memory_pool=pooled)
        outputs[pooled] = sampler.run(generator=torch.Generator().manual_seed(1), callback=lambda *_: faults.append(
            resource.getrusage(resource.RUSAGE_SELF).ru_minflt))
    torch.testing.assert_close(outputs[True], outputs[False], rtol=0, atol=0)
    assert memory_pool.stats()["hits"] > 100
    assert faults[-1] - faults[0] < 20, faults


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"), reason="no THP")
def test_large_op_outputs_are_huge_page_backed_outside_the_pool():
    """The native ops' large outputs come 2 MiB-aligned and MADV_HUGEPAGE (far fewer first-touch
    faults than 4 KiB pages, where THP is on); small ones and those made inside the pool do not."""
    from fastddpm import ops
    from fastddpm.ops import PhiloxState

    table = Schedule.linear().table("noising", "cpu")
    x0, t = torch.randn(4, 3 * (1 << 20) + 5), torch.tensor([0, 10, 500, 999])  # 48 MiB, odd rows
    xt, z = ops.q_sample(x0, t, table, rng=PhiloxState(3), backend="native")
    assert xt.data_ptr() % (2 << 20) == 0 and z.data_ptr() % (2 << 20) == 0
    assert torch.equal(xt, ops.q_sample(x0, t, table, z, backend="reference")[0])
    xt.resize_(8, 3 * (1 << 20) + 5)  # the storage stays resizable
    xt[4:] = 1.0
    assert torch.equal(xt[:4], ops.q_sample(x0, t, table, z, backend="reference")[0])
    step = ops.ddpm_step(x0, x0, t, Schedule.linear().table("step", "cpu"), rng=PhiloxState(3), backend="native")
    gn = ops.group_norm_act(x0[:, :3 << 20].view(4, 3, 1 << 20, 1)[:, :, 1:], None, None, 3, 1e-6, backend="native")
    assert step.data_ptr() % (2 << 20) == 0 and gn.data_ptr() % (2 << 20) == 0
    mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    if "[never]" not in mode:
        before = _minor_faults()
        ops.q_sample(x0, t, table, rng=PhiloxState(4), backend="native")
        assert _minor_faults() - before < 48 * 2**20 / 4096 / 4  # far fewer than one per 4 KiB page
    with cpu_memory_pool():
        hits = memory_pool.stats()["misses"] + memory_pool.stats()["hits"]
        ops.q_sample(x0, t, table, rng=PhiloxState(3), backend="native")
        assert memory_pool.stats()["misses"] + memory_pool.stats()["hits"] >= hits + 2  # the pool served both
