"""Per-image seeds: image i of a run with seed s depends on (s, i) only — not on the batch size or
where its batch starts — bit for bit on the CPU, for both noise sources."""

import pytest
import torch

from fastddpm import UNet, UNetConfig, ops, sample
from fastddpm.ops import PhiloxState, philox_normal
from fastddpm.sampling.noise import NoiseSource, image_seed

from conftest import randomize_zero_init

TINY = UNetConfig(resolution=8, in_channels=1, out_channels=1, ch=8, ch_mult=(1,), num_res_blocks=1,
                  attn_resolutions=(), groups=4, dropout=0.0)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return randomize_zero_init(UNet(TINY)).eval()


def _sample(model, n, **kw):
    return sample(model, n, steps=5, seed=3, per_image_seeds=True, progress=False, **kw)


@pytest.mark.parametrize("source", ["generator", "philox"])
def test_an_image_does_not_depend_on_its_batch(tiny, source):
    whole = _sample(tiny, 8, noise_source=source, batch_size=8)
    assert torch.equal(_sample(tiny, 8, noise_source=source, batch_size=3), whole)  # batches 3, 3, 2
    assert torch.equal(_sample(tiny, 3, noise_source=source, first_index=5), whole[5:])
    assert torch.equal(_sample(tiny, 1, noise_source=source, first_index=2), whole[2:3])  # a lone image
    assert not torch.equal(whole[0], whole[1])  # each image its own stream
    other = sample(tiny, 8, steps=5, seed=4, per_image_seeds=True, progress=False, noise_source=source)
    assert (other - whole).abs().amax(dim=(1, 2, 3)).min() > 0.1  # another seed: other images


def test_winograd_convolutions_do_not_depend_on_the_batch():
    """128 channels at 16x16: a batch of 16 has enough tiles for F(4x4), a batch of 3 does not; per-image
    runs choose (and run) each image's variant on its own, so the images stay bit-equal."""
    from fastddpm.models import winograd

    if not winograd.available():
        pytest.skip("native extension not built")
    torch.manual_seed(0)
    wide = randomize_zero_init(UNet(UNetConfig(resolution=16, in_channels=1, out_channels=1, ch=128, ch_mult=(1,),
                                               num_res_blocks=1, attn_resolutions=(), groups=32, dropout=0.0))).eval()
    assert winograd.choose_tile(torch.float32, 128, 16, 16, 16) != winograd.choose_tile(torch.float32, 128, 3, 16, 16)
    whole = _sample(wide, 16, batch_size=16)
    assert torch.equal(_sample(wide, 16, batch_size=3), whole)
    assert torch.equal(_sample(wide, 1, first_index=7), whole[7:8])


def test_a_based_philox_state_draws_that_part_of_the_stream():
    table = torch.tensor([[0.0, 1.0]])  # x_t = z: q_sample returns the drawn noise itself
    for backend in ("native", "reference"):
        if backend == "native" and not ops.native_status().startswith("cpu"):
            continue
        state = PhiloxState(7, offset=3, base=12296)
        xt, _ = ops.q_sample(torch.zeros(2, 5000), torch.tensor([0, 0]), table, rng=state, backend=backend)
        assert torch.equal(xt.flatten(), philox_normal(10000, 7, 3, first=12296)), backend
        assert state.tensor.tolist() == [7, 4, 12296]  # a draw advances the offset, not the base
    assert torch.equal(philox_normal(37, 1, 2, first=13), philox_normal(100, 1, 2)[13:50])


def test_per_image_generator_seeds_are_hashed():
    seeds = {image_seed(s, i) for s in range(3) for i in range(100)}
    assert len(seeds) == 300 and image_seed(0, 1) != image_seed(1, 0)


@pytest.mark.parametrize("kwargs, error, text", [
    (dict(first_index=3), ValueError, "first_index"),
    (dict(per_image_seeds=True, generator=torch.Generator()), ValueError, "generator"),
    (dict(per_image_seeds=True, first_index=-1), ValueError, "first_index"),
    (dict(per_image_seeds=1), TypeError, "per_image_seeds"),
    (dict(per_image_seeds=True, noise_source="philox", shape=(1, 3, 3)), ValueError, "shape"),
])
def test_bad_per_image_arguments(kwargs, error, text):
    with pytest.raises(error, match=f"^{text}"):
        sample(lambda x, t: x, 2, steps=2, progress=False, **{"shape": (1, 4, 4), **kwargs})


def test_philox_state_base_is_whole_blocks():
    with pytest.raises(ValueError, match="^base"):
        PhiloxState(1, base=6)
    with pytest.raises(ValueError, match="^shape"):
        NoiseSource.per_image("philox", 1, 0, (3, 5, 5))


def test_batch_invariance_is_computed_on_the_cpu_only():
    # on CUDA cuDNN/cuBLAS choose by batch size anyway: there only the noise is per image (docs/distributed.md)
    from fastddpm.sampling.api import batch_invariant_here

    assert batch_invariant_here(True, torch.device("cpu"))
    assert not batch_invariant_here(True, torch.device("cuda"))
    assert not batch_invariant_here(False, torch.device("cpu"))
