"""Convert between diffusers ``UNet2DModel`` and fastddpm :class:`UNet`, both ways.

diffusers is never imported here: configs are plain dicts (or diffusers config objects) and
weights plain state dicts, so a folder saved by diffusers converts without diffusers installed.

* :func:`config_from_diffusers` / :func:`diffusers_config`: the two configs of one architecture.
* :func:`convert_state_dict` / :func:`to_diffusers_state_dict`: the two state dicts of one model.
* :func:`unet_from_diffusers`: a ready :class:`UNet` from a diffusers model object.

Example::

    from diffusers import UNet2DModel
    unet = UNet2DModel.from_pretrained(local_dir)   # a directory you have; nothing is downloaded here
    model = fastddpm.models.unet_from_diffusers(unet)
    x = fastddpm.sample(fastddpm.DDPM(model, fastddpm.Schedule.linear()), 16)
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Tuple

import torch
from torch import nn

from .unet import UNet, UNetConfig

Tensors = Dict[str, torch.Tensor]

_EXPECTED = {"flip_sin_to_cos": False, "freq_shift": 1, "downsample_padding": 0, "act_fn": "silu",
             "time_embedding_type": "positional", "resnet_time_scale_shift": "default",
             "center_input_sample": False, "add_attention": True, "class_embed_type": None}


def _getter(cfg):
    if isinstance(cfg, dict):
        return cfg.get
    return lambda k, d=None: getattr(cfg, k, d)


def config_from_diffusers(cfg) -> UNetConfig:
    """The :class:`UNetConfig` of a diffusers ``UNet2DModel`` config (a dict or a config object);
    ValueError naming every setting of it that fastddpm's U-Net does not have."""
    get = _getter(cfg)
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


def _level_has_attention(config: UNetConfig) -> List[bool]:
    return [config.resolution // 2**level in config.attn_resolutions for level in range(len(config.ch_mult))]


def diffusers_config(config: UNetConfig) -> dict:
    """The diffusers ``UNet2DModel`` config (``"_class_name": "UNet2DModel"``) that builds the
    architecture of ``config``; :func:`to_diffusers_state_dict` gives its weights."""
    attn = _level_has_attention(config)
    downs = ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn]
    return {"_class_name": "UNet2DModel", "sample_size": config.resolution,
            "in_channels": config.in_channels, "out_channels": config.out_channels,
            "center_input_sample": False, "time_embedding_type": "positional", "freq_shift": 1,
            "flip_sin_to_cos": False, "down_block_types": downs,
            "up_block_types": [b.replace("Down", "Up") for b in reversed(downs)],
            "block_out_channels": [config.ch * m for m in config.ch_mult],
            "layers_per_block": config.num_res_blocks, "mid_block_scale_factor": 1,
            "downsample_padding": 0, "downsample_type": "conv", "upsample_type": "conv",
            "dropout": config.dropout, "act_fn": "silu", "attention_head_dim": None,
            "norm_num_groups": config.groups, "attn_norm_num_groups": None, "norm_eps": config.norm_eps,
            "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
            "num_class_embeds": None}


# The module correspondence, walked by both directions of the conversion: (fastddpm prefix,
# diffusers prefix, kind) with kind "layer" (weight and bias as they are), "resnet" or "attn".
_RESNET_LAYERS = (("norm1", "norm1"), ("conv1", "conv1"), ("temb_proj", "time_emb_proj"),
                  ("norm2", "norm2"), ("conv2", "conv2"), ("shortcut", "conv_shortcut"))


def _modules(config: UNetConfig) -> Iterator[Tuple[str, str, str]]:
    yield from (("conv_in", "conv_in", "layer"), ("temb.0", "time_embedding.linear_1", "layer"),
                ("temb.2", "time_embedding.linear_2", "layer"))
    levels, attn, k = len(config.ch_mult), _level_has_attention(config), 0
    for level in range(levels):
        for j in range(config.num_res_blocks):
            yield f"down.{k}.res", f"down_blocks.{level}.resnets.{j}", "resnet"
            if attn[level]:
                yield f"down.{k}.attn", f"down_blocks.{level}.attentions.{j}", "attn"
            k += 1
        if level != levels - 1:
            yield f"down.{k}.conv", f"down_blocks.{level}.downsamplers.0.conv", "layer"
            k += 1
    yield "mid1", "mid_block.resnets.0", "resnet"
    yield "mid_attn", "mid_block.attentions.0", "attn"
    yield "mid2", "mid_block.resnets.1", "resnet"
    k = 0
    for i, level in enumerate(reversed(range(levels))):
        for j in range(config.num_res_blocks + 1):
            yield f"up.{k}.res", f"up_blocks.{i}.resnets.{j}", "resnet"
            if attn[level]:
                yield f"up.{k}.attn", f"up_blocks.{i}.attentions.{j}", "attn"
            k += 1
        if level != 0:
            yield f"up.{k}.conv", f"up_blocks.{i}.upsamplers.0.conv", "layer"
            k += 1
    yield from (("norm_out", "conv_norm_out", "layer"), ("conv_out", "conv_out", "layer"))


def _layer_pairs(config: UNetConfig) -> Iterator[Tuple[str, str, str]]:
    """(fastddpm prefix, diffusers prefix, kind) of every layer; kind "attn" marks the attention
    blocks, whose q/k/v/out layers are not one-to-one."""
    for fast, theirs, kind in _modules(config):
        if kind == "resnet":
            for a, b in _RESNET_LAYERS:
                yield f"{fast}.{a}", f"{theirs}.{b}", "layer"
        elif kind == "attn":
            yield f"{fast}.norm", f"{theirs}.group_norm", "layer"
            yield fast, theirs, "attn"
        else:
            yield fast, theirs, kind


def _copy_layer(src: Tensors, s: str, d: str, out: Tensors):
    # Optional layers (a ResBlock's 1x1 shortcut, a norm-less attention) are absent from both sides.
    for p in ("weight", "bias"):
        if f"{s}.{p}" in src:
            out[f"{d}.{p}"] = src[f"{s}.{p}"]


def _attention_to_fast(src: Tensors, s: str, d: str, out: Tensors):
    # diffusers' q/k/v/out are Linear layers; fastddpm's are one 1x1 conv (q, k, v stacked) and another.
    out[f"{d}.qkv.weight"] = torch.cat([src[f"{s}.to_{n}.weight"] for n in "qkv"])[:, :, None, None]
    out[f"{d}.qkv.bias"] = torch.cat([src[f"{s}.to_{n}.bias"] for n in "qkv"])
    out[f"{d}.proj_out.weight"] = src[f"{s}.to_out.0.weight"][:, :, None, None]
    out[f"{d}.proj_out.bias"] = src[f"{s}.to_out.0.bias"]


def _attention_to_diffusers(src: Tensors, s: str, d: str, out: Tensors):
    for n, w, b in zip("qkv", src[f"{s}.qkv.weight"].chunk(3), src[f"{s}.qkv.bias"].chunk(3)):
        out[f"{d}.to_{n}.weight"], out[f"{d}.to_{n}.bias"] = w[:, :, 0, 0], b
    out[f"{d}.to_out.0.weight"] = src[f"{s}.proj_out.weight"][:, :, 0, 0]
    out[f"{d}.to_out.0.bias"] = src[f"{s}.proj_out.bias"]


def _contiguous(state: Tensors) -> Tensors:
    # Slices and views of the source would share (and, saved, drag along) its storage.
    return {k: v.detach().contiguous() for k, v in state.items()}


def convert_state_dict(diffusers_config: dict, state: Tensors) -> Tensors:
    """The fastddpm :class:`UNet` state dict of the diffusers ``UNet2DModel`` whose config and
    state dict are given (config checked by :func:`config_from_diffusers`; dtypes kept)."""
    config = config_from_diffusers(diffusers_config)
    out: Tensors = {}
    for fast, theirs, kind in _layer_pairs(config):
        (_attention_to_fast if kind == "attn" else _copy_layer)(state, theirs, fast, out)
    return _contiguous(out)


def to_diffusers_state_dict(model_or_state, config: UNetConfig) -> Tensors:
    """The diffusers ``UNet2DModel`` state dict (for ``UNet2DModel(**diffusers_config(config))``)
    of a fastddpm :class:`UNet` of architecture ``config``, or of its state dict."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    if not isinstance(state, dict):
        raise TypeError(f"model_or_state: expected a UNet or its state dict, got {type(state).__name__}")
    out: Tensors = {}
    for fast, theirs, kind in _layer_pairs(config):
        (_attention_to_diffusers if kind == "attn" else _copy_layer)(state, fast, theirs, out)
    return _contiguous(out)


def unet_from_diffusers(unet) -> UNet:
    """A fastddpm :class:`UNet` (float32) with the weights of diffusers ``UNet2DModel`` ``unet``
    (same outputs)."""
    config = config_from_diffusers(unet.config)
    state = {k: v.detach().float() for k, v in unet.state_dict().items()}
    model = UNet(config)
    model.load_state_dict(convert_state_dict(dict(unet.config), state), strict=True)
    return model
