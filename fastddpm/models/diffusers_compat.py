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

from .unet import TIME_SCALE_SHIFTS, UNet, UNetConfig

Tensors = Dict[str, torch.Tensor]

# diffusers' UNet2DModel defaults (diffusers 0.2x-0.4x), for the keys a config dict leaves out: what
# UNet2DModel(**config) would build. A test compares them with the installed signature.
DIFFUSERS_DEFAULTS = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896), "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0,
    "act_fn": "silu", "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None,
    "norm_eps": 1e-5, "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
    "num_class_embeds": None, "num_train_timesteps": None,
}

# The settings of which fastddpm's U-Net builds only some values: those values.
_ALLOWED = {"time_embedding_type": ("positional",), "class_embed_type": (None,), "num_class_embeds": (None,),
            "resnet_time_scale_shift": TIME_SCALE_SHIFTS, "act_fn": ("silu", "swish"),
            "mid_block_type": ("UNetMidBlock2D",), "downsample_type": ("conv",), "upsample_type": ("conv",),
            "downsample_padding": (0, 1), "center_input_sample": (False, True), "add_attention": (False, True)}
_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")


def _getter(cfg):
    if isinstance(cfg, dict):
        return lambda k: cfg.get(k, DIFFUSERS_DEFAULTS.get(k))
    return lambda k: getattr(cfg, k, DIFFUSERS_DEFAULTS.get(k))


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _structure_problems(get) -> List[str]:
    """What in the block layout, channels and heads fastddpm's U-Net cannot build."""
    downs, ups, chans = get("down_block_types"), get("up_block_types"), get("block_out_channels")
    # a config read from a file may hold anything: check the types before any arithmetic
    if not all(isinstance(v, (list, tuple)) and v for v in (downs, ups, chans)) \
            or not all(_positive_int(c) for c in chans):
        return [f"down_block_types={downs!r} / up_block_types={ups!r} / block_out_channels={chans!r} "
                f"(expected non-empty lists of block names and of positive ints)"]
    downs, ups, chans = list(downs), list(ups), list(chans)
    problems = []
    if any(b not in _BLOCKS for b in downs):
        problems.append(f"down_block_types={downs} (expected {' / '.join(_BLOCKS)} only)")
    if [b.replace("Up", "Down", 1) for b in reversed(ups)] != downs:
        problems.append(f"up_block_types={ups} (expected the mirror of down_block_types: AttnUpBlock2D "
                        f"where the level's AttnDownBlock2D is)")
    if len(chans) != len(downs) or any(c % chans[0] for c in chans):
        problems.append(f"block_out_channels={chans} (expected one per level, multiples of the first)")
    if get("norm_num_groups") is None:
        problems.append("norm_num_groups=None (expected an int)")
    head = get("attention_head_dim")
    attn_chans = [c for c, b in zip(chans, downs) if b.startswith("Attn")] + chans[-1:] * bool(get("add_attention"))
    if head is not None and (not _positive_int(head) or any(c % head for c in attn_chans)):
        problems.append(f"attention_head_dim={head!r} (expected a divisor of every attention block's "
                        f"channels {sorted(set(attn_chans))}, or None)")
    size = get("sample_size")
    if not isinstance(size, int) and not (isinstance(size, (list, tuple)) and len(size) == 2):
        problems.append(f"sample_size={size!r} (expected the training resolution, an int or [H, W])")
    return problems


def config_from_diffusers(cfg) -> UNetConfig:
    """The :class:`UNetConfig` of a diffusers ``UNet2DModel`` config (a dict, keys it lacks taking
    diffusers' defaults, or a config object); ValueError naming every setting of it that
    fastddpm's U-Net does not have (class conditioning, Fourier / learned time embeddings, other
    block types, resnet up/down-samplers, activations other than SiLU, ...)."""
    get = _getter(cfg)
    problems = [f"{k}={get(k)!r} (expected one of {v})" for k, v in _ALLOWED.items() if get(k) not in v]
    name = get("_class_name")
    if name not in (None, "UNet2DModel"):
        problems.append(f"_class_name={name!r} (expected 'UNet2DModel')")
    problems += _structure_problems(get)
    if problems:
        raise ValueError("unet: a UNet2DModel config fastddpm cannot convert: " + "; ".join(problems))
    chans, downs = list(get("block_out_channels")), list(get("down_block_types"))
    size = get("sample_size")
    res = size if isinstance(size, int) else size[0]
    scale_shift = get("resnet_time_scale_shift")
    attn_groups = get("attn_norm_num_groups")
    if attn_groups is None:  # diffusers' mid-block attention has no GroupNorm under AdaGN unless told
        attn_groups = None if scale_shift == "default" else 0
    return UNetConfig(
        resolution=res, in_channels=get("in_channels"), out_channels=get("out_channels"), ch=chans[0],
        ch_mult=tuple(c // chans[0] for c in chans), num_res_blocks=get("layers_per_block"),
        attn_resolutions=tuple(res // 2**level for level, b in enumerate(downs) if b.startswith("Attn")),
        dropout=float(get("dropout") or 0.0), groups=get("norm_num_groups"), norm_eps=float(get("norm_eps")),
        flip_sin_to_cos=get("flip_sin_to_cos"), freq_shift=get("freq_shift"),
        attention_head_dim=get("attention_head_dim"), downsample_padding=get("downsample_padding"),
        resnet_time_scale_shift=scale_shift, time_embedding_dim=get("time_embedding_dim"),
        mid_attention=bool(get("add_attention")), mid_attn_groups=attn_groups,
        mid_block_scale_factor=get("mid_block_scale_factor"), center_input_sample=bool(get("center_input_sample")))


def _level_has_attention(config: UNetConfig) -> List[bool]:
    return [config.resolution // 2**level in config.attn_resolutions for level in range(len(config.ch_mult))]


def _attn_norm_num_groups(config: UNetConfig):
    """diffusers' attn_norm_num_groups for fastddpm's mid_attn_groups (None: diffusers' default)."""
    if config.mid_attn_groups is None:  # `groups`, which diffusers defaults to only without AdaGN
        return config.groups if config.scale_shift else None
    if config.mid_attn_groups:
        return config.mid_attn_groups
    if config.scale_shift or not config.mid_attention:
        return None
    raise ValueError("mid_attn_groups: 0 (a middle attention without GroupNorm) has no diffusers "
                     "UNet2DModel equivalent unless resnet_time_scale_shift='scale_shift'")


def diffusers_config(config: UNetConfig) -> dict:
    """The diffusers ``UNet2DModel`` config (``"_class_name": "UNet2DModel"``) that builds the
    architecture of ``config``; :func:`to_diffusers_state_dict` gives its weights."""
    downs = ["AttnDownBlock2D" if a else "DownBlock2D" for a in _level_has_attention(config)]
    return {"_class_name": "UNet2DModel", "sample_size": config.resolution,
            "in_channels": config.in_channels, "out_channels": config.out_channels,
            "center_input_sample": config.center_input_sample, "time_embedding_type": "positional",
            "time_embedding_dim": config.time_embedding_dim, "freq_shift": config.freq_shift,
            "flip_sin_to_cos": config.flip_sin_to_cos, "down_block_types": downs,
            "mid_block_type": "UNetMidBlock2D",
            "up_block_types": [b.replace("Down", "Up") for b in reversed(downs)],
            "block_out_channels": [config.ch * m for m in config.ch_mult],
            "layers_per_block": config.num_res_blocks, "mid_block_scale_factor": config.mid_block_scale_factor,
            "downsample_padding": config.downsample_padding, "downsample_type": "conv", "upsample_type": "conv",
            "dropout": config.dropout, "act_fn": "silu", "attention_head_dim": config.attention_head_dim,
            "norm_num_groups": config.groups, "attn_norm_num_groups": _attn_norm_num_groups(config),
            "norm_eps": config.norm_eps, "resnet_time_scale_shift": config.resnet_time_scale_shift,
            "add_attention": config.mid_attention, "class_embed_type": None, "num_class_embeds": None,
            "num_train_timesteps": None}


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
    if config.mid_attention:
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


def _unet_keys(config: UNetConfig) -> set:
    with torch.device("meta"):  # the modules' names and nothing allocated
        return set(UNet(config).state_dict())


def _check_keys(name: str, state, expected: set):
    if not isinstance(state, dict):
        raise TypeError(f"{name}: expected a state dict, got {type(state).__name__}")
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{name}: not the state dict of this architecture: missing {missing[:8]}"
                         f"{' ...' * (len(missing) > 8)}, unexpected {unexpected[:8]}{' ...' * (len(unexpected) > 8)}")


def convert_state_dict(diffusers_config: dict, state: Tensors) -> Tensors:
    """The fastddpm :class:`UNet` state dict of the diffusers ``UNet2DModel`` whose config and
    state dict are given (config checked by :func:`config_from_diffusers`; dtypes kept);
    ValueError naming the keys that are missing or that the architecture has no place for."""
    config = config_from_diffusers(diffusers_config)
    _check_keys("state", state, _diffusers_keys(config))
    out: Tensors = {}
    for fast, theirs, kind in _layer_pairs(config):
        (_attention_to_fast if kind == "attn" else _copy_layer)(state, theirs, fast, out)
    return _contiguous(out)


def _diffusers_keys(config: UNetConfig) -> set:
    # the image of the fastddpm names under the mapping, converted as names only
    fake = {k: torch.empty(3, 1, 1, 1, device="meta") for k in _unet_keys(config)}
    keys: Tensors = {}
    for fast, theirs, kind in _layer_pairs(config):
        (_attention_to_diffusers if kind == "attn" else _copy_layer)(fake, fast, theirs, keys)
    return set(keys)


def to_diffusers_state_dict(model_or_state, config: UNetConfig) -> Tensors:
    """The diffusers ``UNet2DModel`` state dict (for ``UNet2DModel(**diffusers_config(config))``)
    of a fastddpm :class:`UNet` of architecture ``config``, or of its state dict."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    _check_keys("model_or_state", state, _unet_keys(config))
    out: Tensors = {}
    for fast, theirs, kind in _layer_pairs(config):
        (_attention_to_diffusers if kind == "attn" else _copy_layer)(state, fast, theirs, out)
    return _contiguous(out)


def unet_from_diffusers(unet) -> UNet:
    """A fastddpm :class:`UNet` (float32) with the weights of diffusers ``UNet2DModel`` ``unet``
    (same outputs); a ``torch.compile``'d U-Net is read through to the module it wraps."""
    unet = getattr(unet, "_orig_mod", unet)  # torch.compile's OptimizedModule prefixes every key
    config = config_from_diffusers(unet.config)
    state = {k: v.detach().float() for k, v in unet.state_dict().items()}
    model = UNet(config)
    model.load_state_dict(convert_state_dict(dict(unet.config), state), strict=True)
    return model
