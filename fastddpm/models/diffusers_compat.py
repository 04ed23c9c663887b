"""Load the weights of a diffusers ``UNet2DModel`` with the DDPM paper's architecture (e.g. the
config of google/ddpm-cifar10-32) into a fastddpm :class:`UNet`, so the fast sampler can run a
model trained with diffusers. diffusers is needed only to build the source model, never here.

Example::

    from diffusers import UNet2DModel
    unet = UNet2DModel.from_pretrained(local_dir)   # a directory you have; nothing is downloaded here
    model = fastddpm.models.unet_from_diffusers(unet)
    x = fastddpm.sample(fastddpm.DDPM(model, fastddpm.Schedule.linear()), 16)
"""

from __future__ import annotations

from typing import Dict, List

import torch

from .unet import UNet, UNetConfig

_EXPECTED = {"flip_sin_to_cos": False, "freq_shift": 1, "downsample_padding": 0, "act_fn": "silu",
             "time_embedding_type": "positional", "resnet_time_scale_shift": "default",
             "center_input_sample": False, "add_attention": True, "class_embed_type": None}


def config_from_diffusers(cfg) -> UNetConfig:
    """The :class:`UNetConfig` of a diffusers ``UNet2DModel`` config; ValueError naming every setting
    of it that the paper's U-Net does not have."""
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    problems: List[str] = [f"{k}={get(k)!r} (expected {v!r})" for k, v in _EXPECTED.items()
                           if get(k, v) != v]
    downs, ups = list(get("down_block_types")), list(get("up_block_types"))
    if any(b not in ("DownBlock2D", "AttnDownBlock2D") for b in downs):
        problems.append(f"down_block_types={downs} (expected DownBlock2D / AttnDownBlock2D)")
    if [b.replace("Up", "Down") for b in reversed(ups)] != downs:
        problems.append(f"up_block_types={ups} (expected the mirror of down_block_types)")
    chans = list(get("block_out_channels"))
    ch = chans[0]
    if any(c % ch for c in chans):
        problems.append(f"block_out_channels={chans} (expected multiples of the first)")
    head = get("attention_head_dim")
    attn_chans = {c for c, b in zip(chans, downs) if b.startswith("Attn")}
    if head is not None and attn_chans != {head}:
        problems.append(f"attention_head_dim={head!r} (expected None: one head, as in the paper)")
    if problems:
        raise ValueError("unet: not the DDPM paper's U-Net: " + "; ".join(problems))
    res = get("sample_size")
    res = res if isinstance(res, int) else res[0]
    attn = tuple(res // 2**level for level, b in enumerate(downs) if b.startswith("Attn"))
    return UNetConfig(resolution=res, in_channels=get("in_channels"), out_channels=get("out_channels"), ch=ch,
                      ch_mult=tuple(c // ch for c in chans), num_res_blocks=get("layers_per_block"),
                      attn_resolutions=attn, dropout=float(get("dropout", 0.0) or 0.0),
                      groups=get("norm_num_groups"), norm_eps=float(get("norm_eps")))


def _resnet(src: Dict[str, torch.Tensor], s: str, d: str, out: Dict[str, torch.Tensor]):
    for a, b in (("norm1", "norm1"), ("conv1", "conv1"), ("time_emb_proj", "temb_proj"), ("norm2", "norm2"),
                 ("conv2", "conv2"), ("conv_shortcut", "shortcut")):
        for p in ("weight", "bias"):
            if f"{s}.{a}.{p}" in src:
                out[f"{d}.{b}.{p}"] = src[f"{s}.{a}.{p}"]


def _attention(src: Dict[str, torch.Tensor], s: str, d: str, out: Dict[str, torch.Tensor]):
    for p in ("weight", "bias"):
        out[f"{d}.norm.{p}"] = src[f"{s}.group_norm.{p}"]
    qkv = [src[f"{s}.to_{n}.weight"] for n in "qkv"]
    out[f"{d}.qkv.weight"] = torch.cat(qkv)[:, :, None, None]
    out[f"{d}.qkv.bias"] = torch.cat([src[f"{s}.to_{n}.bias"] for n in "qkv"])
    out[f"{d}.proj_out.weight"] = src[f"{s}.to_out.0.weight"][:, :, None, None]
    out[f"{d}.proj_out.bias"] = src[f"{s}.to_out.0.bias"]


def unet_from_diffusers(unet) -> UNet:
    """A fastddpm :class:`UNet` with the weights of diffusers ``UNet2DModel`` ``unet`` (same outputs)."""
    config = config_from_diffusers(unet.config)
    src = {k: v.detach().float() for k, v in unet.state_dict().items()}
    out: Dict[str, torch.Tensor] = {}
    for a, b in (("conv_in", "conv_in"), ("time_embedding.linear_1", "temb.0"),
                 ("time_embedding.linear_2", "temb.2"), ("conv_norm_out", "norm_out"), ("conv_out", "conv_out")):
        for p in ("weight", "bias"):
            out[f"{b}.{p}"] = src[f"{a}.{p}"]
    has_attn = [b.startswith("Attn") for b in unet.config.down_block_types]
    k = 0
    for level in range(len(config.ch_mult)):
        for j in range(config.num_res_blocks):
            _resnet(src, f"down_blocks.{level}.resnets.{j}", f"down.{k}.res", out)
            if has_attn[level]:
                _attention(src, f"down_blocks.{level}.attentions.{j}", f"down.{k}.attn", out)
            k += 1
        if level != len(config.ch_mult) - 1:
            for p in ("weight", "bias"):
                out[f"down.{k}.conv.{p}"] = src[f"down_blocks.{level}.downsamplers.0.conv.{p}"]
            k += 1
    _resnet(src, "mid_block.resnets.0", "mid1", out)
    _attention(src, "mid_block.attentions.0", "mid_attn", out)
    _resnet(src, "mid_block.resnets.1", "mid2", out)
    k = 0
    for up_index, level in enumerate(reversed(range(len(config.ch_mult)))):
        for j in range(config.num_res_blocks + 1):
            _resnet(src, f"up_blocks.{up_index}.resnets.{j}", f"up.{k}.res", out)
            if has_attn[level]:
                _attention(src, f"up_blocks.{up_index}.attentions.{j}", f"up.{k}.attn", out)
            k += 1
        if level != 0:
            for p in ("weight", "bias"):
                out[f"up.{k}.conv.{p}"] = src[f"up_blocks.{up_index}.upsamplers.0.conv.{p}"]
            k += 1
    model = UNet(config)
    model.load_state_dict(out, strict=True)
    return model
