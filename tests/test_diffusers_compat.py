"""fastddpm against diffusers (an optional dependency; skipped without it): a UNet2DModel with the
paper's architecture gives the same outputs once converted, and DDPMPipeline (fixed_large, clip)
gives the same samples as fastddpm's sampler from the same generator."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fastddpm import DDPM, Schedule, sample  # noqa: E402
from fastddpm.models import unet_from_diffusers  # noqa: E402


def small_unet2d(seed=0):
    """The google/ddpm-cifar10-32 config, narrower (32/64 channels, one block per level)."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, norm_eps=1e-6,
                                 freq_shift=1, flip_sin_to_cos=False, downsample_padding=0, attention_head_dim=None)
    with torch.no_grad():  # diffusers initialises some output convs to small values; make every layer count
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return unet.eval()


def test_converted_unet_matches_diffusers_outputs():
    unet = small_unet2d()
    model = unet_from_diffusers(unet).eval()
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([0, 421, 999])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), unet(x, t).sample, rtol=1e-4, atol=1e-4)


def test_sampler_matches_ddpm_pipeline_with_the_same_generator():
    unet = small_unet2d(1)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_large",
                                        clip_sample=True)
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(batch_size=2, generator=torch.Generator().manual_seed(5), num_inference_steps=10,
                  output_type="np").images
    # diffusers' 10 steps are its "leading" timesteps 900, 800, ..., 0: the same respacing here
    schedule = Schedule.linear().respace(sorted(pipe.scheduler.timesteps.tolist()))
    ours = sample(DDPM(unet_from_diffusers(unet), schedule), 2, generator=torch.Generator().manual_seed(5),
                  progress=False)
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(ours - theirs).max() < 1e-4


def test_unsupported_configs_are_named():
    unet = diffusers.UNet2DModel(sample_size=32, block_out_channels=(32, 64), layers_per_block=1,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    with pytest.raises(ValueError, match=r"flip_sin_to_cos=True .*freq_shift=0.*attention_head_dim=8"):
        unet_from_diffusers(unet)


def test_sampler_embeds_a_diffusers_unet_directly():
    """No conversion: any eps_model(x, t) works, here diffusers' UNet2DModel behind a lambda."""
    from fastddpm import Sampler

    unet = small_unet2d(2)
    schedule = Schedule.linear().respaced(8)
    coeffs = schedule.table("step", "cpu", sampler="ddpm", variance="fixed_large")
    shape = (2, 3, 32, 32)
    direct = Sampler(lambda x, t: unet(x, t).sample, schedule, coeffs, shape).run(
        generator=torch.Generator().manual_seed(4))
    converted = Sampler(unet_from_diffusers(unet).eval(), schedule, coeffs, shape).run(
        generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(direct, converted, rtol=1e-4, atol=1e-4)


def test_paper_architecture_exports_to_diffusers_and_back():
    from fastddpm import UNet
    from fastddpm.models import convert_state_dict, diffusers_config, to_diffusers_state_dict

    torch.manual_seed(0)
    model = UNet(resolution=16, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), groups=4).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    cfg = diffusers_config(model.config)
    unet = diffusers.UNet2DModel(**{k: v for k, v in cfg.items() if k != "_class_name"}).eval()
    unet.load_state_dict(to_diffusers_state_dict(model, model.config), strict=True)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t).sample, model(x, t), rtol=1e-4, atol=1e-4)
    back = to_diffusers_state_dict(convert_state_dict(cfg, unet.state_dict()), model.config)
    assert back.keys() == unet.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in unet.state_dict().items())
