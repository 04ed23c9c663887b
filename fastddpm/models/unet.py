"""The U-Net of Ho et al. 2020 (appendix B; the official diffusion_tf `models/unet.py`), exactly.

Sinusoidal timestep embedding -> dense(4ch) -> SiLU -> dense(4ch); ResBlocks
``GN -> SiLU -> conv3x3 -> (+ dense(SiLU(temb))) -> GN -> SiLU -> dropout -> conv3x3`` with the time
embedding added in every block; single-head self-attention at the chosen resolutions and in the
middle; stride-2 conv downsampling, nearest + conv upsampling; the last conv of every residual
branch and the output conv are zero-initialised. The GroupNorm that follows the temb injection is
one fused op (``fastddpm.ops.group_norm_act``).

Further fields of :class:`UNetConfig`, each off by default (the paper's model), give the options of
the diffusers ``UNet2DModel``s people train (:mod:`fastddpm.models.diffusers_compat` converts them):
the sinusoid's order and frequency shift, multi-head attention, padded stride-2 convs, AdaGN
(``resnet_time_scale_shift="scale_shift"``), a wider time embedding, the middle block's attention
(present or not, its own GroupNorm) and output scale, and inputs centred from [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops


# Upper bounds of the architecture fields. They are far above any DDPM (the paper's largest model
# has ch=128, 6 levels, 114M parameters) and keep a config read from an untrusted checkpoint from
# making the constructor allocate gigabytes or run for minutes before anything is checked.
FIELD_LIMITS = {"resolution": 2048, "in_channels": 64, "out_channels": 64, "ch": 1024,
                "num_res_blocks": 64, "groups": 1024}
MAX_TIME_EMBEDDING_DIM = 16 * FIELD_LIMITS["ch"]
# The two ways a ResBlock takes the time embedding: added before norm2 (the paper), or AdaGN's
# scale and shift after it (improved DDPM; diffusers' resnet_time_scale_shift="scale_shift").
TIME_SCALE_SHIFTS = ("default", "scale_shift")
MAX_LEVELS = 8
MAX_CH_MULT = 16
MAX_PARAMETERS = 2_000_000_000


def _check_int(name: str, value, limit: int):
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
        raise ValueError(f"{name}: expected a positive int of at most {limit}, got {value!r}")


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_bool(name: str, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")


# Parameter counts of the U-Net's layers, for UNetConfig.num_parameters.
def _conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k + cout


def _resblock(cin: int, cout: int, temb: int, temb_out: int) -> int:
    shortcut = _conv(cin, cout, 1) if cin != cout else 0
    return 2 * cin + _conv(cin, cout, 3) + (temb * temb_out + temb_out) + 2 * cout + _conv(cout, cout, 3) + shortcut


def _attn(c: int, norm: bool = True) -> int:
    return 2 * c * norm + _conv(c, 3 * c, 1) + _conv(c, c, 1)


@dataclass(frozen=True)
class UNetConfig:
    """Architecture hyper-parameters; what a checkpoint stores to rebuild the model."""

    resolution: int = 32
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: Tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Tuple[int, ...] = (16,)
    dropout: float = 0.1
    groups: int = 32
    norm_eps: float = 1e-6
    # The options of diffusers' UNet2DModel, under its names where the meaning is the same.
    flip_sin_to_cos: bool = False  # the sinusoid as [cos, sin] instead of [sin, cos]
    freq_shift: float = 1  # frequencies exp(-log(10000) i / (ch / 2 - freq_shift))
    attention_head_dim: Optional[int] = None  # channels per attention head; None: one head
    downsample_padding: int = 0  # 0: pad right/bottom by one, then a stride-2 conv; 1: the conv pads 1
    resnet_time_scale_shift: str = "default"  # or "scale_shift": AdaGN, GN(h) * (1 + scale) + shift
    time_embedding_dim: Optional[int] = None  # None: 4 * ch
    mid_attention: bool = True  # diffusers' add_attention: the middle block's attention
    mid_attn_groups: Optional[int] = None  # its GroupNorm's groups; None: `groups`; 0: no GroupNorm
    mid_block_scale_factor: float = 1.0  # the middle block's residual sums are divided by it
    center_input_sample: bool = False  # the input is in [0, 1]: the model maps it to 2 x - 1 first

    def __post_init__(self):
        for name in ("ch_mult", "attn_resolutions"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise TypeError(f"{name}: expected a sequence of positive ints, got {type(value).__name__}")
            object.__setattr__(self, name, tuple(value))
        for name, limit in FIELD_LIMITS.items():
            _check_int(name, getattr(self, name), limit)
        if not 1 <= len(self.ch_mult) <= MAX_LEVELS:
            raise ValueError(f"ch_mult: expected 1 to {MAX_LEVELS} levels, got {len(self.ch_mult)}")
        for m in self.ch_mult:
            _check_int("ch_mult", m, MAX_CH_MULT)
        for r in self.attn_resolutions:
            _check_int("attn_resolutions", r, FIELD_LIMITS["resolution"])
        if self.resolution % 2 ** (len(self.ch_mult) - 1):
            raise ValueError(f"resolution: {self.resolution} is not divisible by "
                             f"2**{len(self.ch_mult) - 1} (one halving per extra ch_mult level)")
        for m in self.ch_mult:
            if (self.ch * m) % self.groups:
                raise ValueError(f"groups: {self.groups} does not divide the channel count "
                                 f"{self.ch * m} (ch={self.ch} x mult {m})")
        if not _is_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a float in [0, 1), got {self.dropout!r}")
        if not _is_real(self.norm_eps) or not 0.0 < self.norm_eps < 1.0:
            raise ValueError(f"norm_eps: expected a float in (0, 1), got {self.norm_eps!r}")
        self._check_options()
        # Every field may be within its bound while their product is not (ch=1024, mult 16, 8
        # levels): bound the size itself, computed here so that nothing is allocated to learn it.
        n = self.num_parameters()
        if n > MAX_PARAMETERS:
            raise ValueError(f"ch / ch_mult / num_res_blocks: ch={self.ch}, ch_mult={self.ch_mult}, "
                             f"num_res_blocks={self.num_res_blocks} give {n:,} parameters, more than "
                             f"the {MAX_PARAMETERS:,} a UNetConfig may have")

    def _check_options(self):
        for name in ("flip_sin_to_cos", "mid_attention", "center_input_sample"):
            _check_bool(name, getattr(self, name))
        if not _is_real(self.freq_shift) or not 0 <= self.freq_shift < self.ch // 2:
            raise ValueError(f"freq_shift: expected a number in [0, ch // 2 = {self.ch // 2}), got {self.freq_shift!r}")
        if self.downsample_padding not in (0, 1) or isinstance(self.downsample_padding, bool):
            raise ValueError(f"downsample_padding: expected 0 or 1, got {self.downsample_padding!r}")
        if self.resnet_time_scale_shift not in TIME_SCALE_SHIFTS:
            raise ValueError(f"resnet_time_scale_shift: expected one of {TIME_SCALE_SHIFTS}, "
                             f"got {self.resnet_time_scale_shift!r}")
        if self.time_embedding_dim is not None:
            _check_int("time_embedding_dim", self.time_embedding_dim, MAX_TIME_EMBEDDING_DIM)
        if not _is_real(self.mid_block_scale_factor) or not 0 < self.mid_block_scale_factor <= 1e6:
            raise ValueError(f"mid_block_scale_factor: expected a number in (0, 1e6], "
                             f"got {self.mid_block_scale_factor!r}")
        mid = self.ch * self.ch_mult[-1]
        if self.mid_attn_groups is not None and self.mid_attn_groups != 0:
            _check_int("mid_attn_groups", self.mid_attn_groups, FIELD_LIMITS["groups"])
            if mid % self.mid_attn_groups:
                raise ValueError(f"mid_attn_groups: {self.mid_attn_groups} does not divide the middle "
                                 f"block's {mid} channels")
        if self.attention_head_dim is not None:
            _check_int("attention_head_dim", self.attention_head_dim, FIELD_LIMITS["ch"] * MAX_CH_MULT)
            for c in self.attention_channels():
                if c % self.attention_head_dim:
                    raise ValueError(f"attention_head_dim: {self.attention_head_dim} does not divide the "
                                     f"{c} channels of an attention block")

    def attention_channels(self) -> Tuple[int, ...]:
        """The channel counts of the attention blocks (levels in ``attn_resolutions``, the middle)."""
        chans = [self.ch * m for level, m in enumerate(self.ch_mult)
                 if self.resolution // 2**level in self.attn_resolutions]
        return tuple(chans + [self.ch * self.ch_mult[-1]] * self.mid_attention)

    @property
    def temb_channels(self) -> int:
        """Width of the time embedding MLP."""
        return self.time_embedding_dim or 4 * self.ch

    @property
    def scale_shift(self) -> bool:
        """Whether the ResBlocks take the time embedding as AdaGN's scale and shift."""
        return self.resnet_time_scale_shift == "scale_shift"

    def num_parameters(self) -> int:
        """The parameter count of ``UNet(self)``, computed from the sizes without building it.

        It walks the same stages as :class:`UNet`'s constructor (the tests check that the two agree
        for every preset), so that an absurd config is refused before anything is allocated.
        """
        ch, temb = self.ch, self.temb_channels
        widen = 2 if self.scale_shift else 1  # AdaGN projects the embedding to a scale and a shift

        def resblock(cin, cout):
            return _resblock(cin, cout, temb, widen * cout)

        total = (ch * temb + temb) + (temb * temb + temb) + _conv(self.in_channels, ch, 3)
        skips, cur, res = [ch], ch, self.resolution
        for level, mult in enumerate(self.ch_mult):
            for _ in range(self.num_res_blocks):
                total += resblock(cur, ch * mult)
                total += _attn(ch * mult) if res in self.attn_resolutions else 0
                cur = ch * mult
                skips.append(cur)
            if level != len(self.ch_mult) - 1:
                total += _conv(cur, cur, 3)
                skips.append(cur)
                res //= 2
        total += 2 * resblock(cur, cur) + (_attn(cur, self.mid_attn_groups != 0) if self.mid_attention else 0)
        for level, mult in reversed(list(enumerate(self.ch_mult))):
            for _ in range(self.num_res_blocks + 1):
                total += resblock(cur + skips.pop(), ch * mult)
                total += _attn(ch * mult) if res in self.attn_resolutions else 0
                cur = ch * mult
            if level != 0:
                total += _conv(cur, cur, 3)
                res *= 2
        return total + 2 * cur + _conv(cur, self.out_channels, 3)

    def to_dict(self) -> dict:
        """Return a JSON-serializable dict."""
        d = asdict(self)
        d["ch_mult"], d["attn_resolutions"] = list(self.ch_mult), list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        """Build from :meth:`to_dict` output, rejecting unknown keys (and, through the constructor,
        sizes beyond :data:`FIELD_LIMITS` and :data:`MAX_PARAMETERS`)."""
        if not isinstance(d, dict):
            raise TypeError(f"model config: expected a dict, got {type(d).__name__}")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"model config: unknown keys {sorted(unknown)}")
        return cls(**d)


PRESETS: Dict[str, UNetConfig] = {
    # The paper's CIFAR-10 model: 35.7M parameters.
    "cifar10": UNetConfig(),
    # The paper's CelebA-HQ / LSUN 256x256 model: ~114M parameters.
    "celebahq": UNetConfig(resolution=256, ch_mult=(1, 1, 2, 2, 4, 4), dropout=0.0),
    # MNIST 28x28 padded to 32x32; small enough to train on 2 CPU cores.
    "mnist": UNetConfig(resolution=32, in_channels=1, out_channels=1, ch=32, ch_mult=(1, 2, 2),
                        num_res_blocks=1, attn_resolutions=(8,), dropout=0.0, groups=8),
    # sklearn digits 8x8: tiny, for tests and demos.
    "digits": UNetConfig(resolution=8, in_channels=1, out_channels=1, ch=32, ch_mult=(1, 2),
                         num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, groups=8),
}


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = False,
                       freq_shift: float = 1) -> torch.Tensor:
    """The transformer sinusoidal embedding of integer timesteps, as in the official DDPM code.

    ``[sin(t * f_0..f_{h-1}), cos(...)]`` with ``f_i = exp(-log(10000) i / (h - freq_shift))``,
    ``h = dim // 2``; ``[cos, sin]`` with ``flip_sin_to_cos`` (diffusers' ``get_timestep_embedding``).
    """
    half = dim // 2
    # the exponent divided (not multiplied by a reciprocal) as diffusers does: the same rounding
    exponent = torch.arange(half, device=t.device, dtype=torch.float32) * -math.log(10000.0)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = t.float()[:, None] * freqs[None, :]
    sin_cos = [torch.sin(args), torch.cos(args)]
    emb = torch.cat(sin_cos[::-1] if flip_sin_to_cos else sin_cos, dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNormAct(nn.GroupNorm):
    """GroupNorm (+ optional per-channel embedding added first) + optional SiLU, as one fused op."""

    def __init__(self, groups: int, channels: int, eps: float, act: bool = True):
        super().__init__(groups, channels, eps)
        self.act = "silu" if act else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor = None) -> torch.Tensor:  # noqa: D102
        return ops.group_norm_act(x, self.weight, self.bias, self.num_groups, self.eps, temb,
                                  self.act)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block with the time embedding injected before the second GroupNorm (or, with
    ``scale_shift``, as AdaGN's per-channel scale and shift after it).

    The residual sum is divided by ``output_scale`` (diffusers' ``output_scale_factor``).
    """

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, groups: int, eps: float,
                 scale_shift: bool = False, output_scale: float = 1.0):
        super().__init__()
        self.scale_shift, self.output_scale = scale_shift, output_scale
        self.norm1 = GroupNormAct(groups, in_ch, eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, 2 * out_ch if scale_shift else out_ch)
        # AdaGN's SiLU follows its scale and shift, so its norm2 fuses only GroupNorm + affine
        self.norm2 = GroupNormAct(groups, out_ch, eps, act=not scale_shift)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def _norm2(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        emb = self.temb_proj(F.silu(temb))
        if not self.scale_shift:
            return self.norm2(h, emb)  # temb add + GroupNorm + affine + SiLU, one fused op
        scale, shift = emb[:, :, None, None].chunk(2, dim=1)
        return F.silu(torch.addcmul(shift, self.norm2(h), 1 + scale))

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:  # noqa: D102
        h = self.conv1(self.norm1(x))
        h = self.conv2(self.dropout(self._norm2(h, temb)))
        out = self.shortcut(x) + h
        return out / self.output_scale if self.output_scale != 1 else out


class AttnBlock(nn.Module):
    """Spatial self-attention (``heads`` heads of ``ch // heads`` consecutive channels each) with a
    residual connection; ``groups=0`` leaves out the GroupNorm, ``output_scale`` divides the sum."""

    def __init__(self, ch: int, groups: int, eps: float, heads: int = 1, output_scale: float = 1.0):
        super().__init__()
        self.heads, self.output_scale = heads, output_scale
        self.norm = GroupNormAct(groups, ch, eps, act=False) if groups else None
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = _zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        B, C, H, W = x.shape
        h = self.norm(x) if self.norm is not None else x
        q, k, v = self.qkv(h).reshape(B, 3, self.heads, C // self.heads, H * W).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)  # [B, heads, HW, C // heads]
        out = x + self.proj_out(h.transpose(-1, -2).reshape(B, C, H, W))
        return out / self.output_scale if self.output_scale != 1 else out


class Downsample(nn.Module):
    """3x3 conv with stride 2, padded (0, 1, 0, 1) like TensorFlow's SAME padding (``padding=0``),
    or by one on every side as the conv's own padding (``padding=1``, diffusers' default)."""

    def __init__(self, ch: int, padding: int = 0):
        super().__init__()
        self.pad_right = padding == 0
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.pad_right else x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """The DDPM U-Net: ``model(x, t) -> eps`` (same shape as ``x``); ``t`` is ``[B]`` timesteps."""

    def __init__(self, config: UNetConfig = None, **overrides):
        super().__init__()
        config = replace(config or UNetConfig(), **overrides)
        self.config = config
        ch, temb_ch, g, eps = config.ch, config.temb_channels, config.groups, config.norm_eps
        self.temb = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skip_chs, cur, res = [ch], ch, config.resolution
        for level, mult in enumerate(config.ch_mult):
            for _ in range(config.num_res_blocks):
                self.down.append(self._stage(cur, ch * mult, res, temb_ch))
                cur = ch * mult
                skip_chs.append(cur)
            if level != len(config.ch_mult) - 1:
                self.down.append(Downsample(cur, config.downsample_padding))
                skip_chs.append(cur)
                res //= 2

        scale = config.mid_block_scale_factor
        self.mid1 = ResBlock(cur, cur, temb_ch, config.dropout, g, eps, config.scale_shift, scale)
        mid_groups = g if config.mid_attn_groups is None else config.mid_attn_groups
        self.mid_attn = (AttnBlock(cur, mid_groups, eps, self._heads(cur), scale) if config.mid_attention
                         else nn.Identity())
        self.mid2 = ResBlock(cur, cur, temb_ch, config.dropout, g, eps, config.scale_shift, scale)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.ch_mult))):
            for _ in range(config.num_res_blocks + 1):
                self.up.append(self._stage(cur + skip_chs.pop(), ch * mult, res, temb_ch))
                cur = ch * mult
            if level != 0:
                self.up.append(Upsample(cur))
                res *= 2

        self.norm_out = GroupNormAct(g, cur, eps)
        self.conv_out = _zero(nn.Conv2d(cur, config.out_channels, 3, padding=1))

    def _stage(self, in_ch: int, out_ch: int, res: int, temb_ch: int) -> nn.ModuleDict:
        c = self.config
        stage = nn.ModuleDict({"res": ResBlock(in_ch, out_ch, temb_ch, c.dropout, c.groups, c.norm_eps,
                                               c.scale_shift)})
        if res in c.attn_resolutions:
            stage["attn"] = AttnBlock(out_ch, c.groups, c.norm_eps, self._heads(out_ch))
        return stage

    def _heads(self, ch: int) -> int:
        head_dim = self.config.attention_head_dim
        return 1 if head_dim is None else ch // head_dim

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "UNet":
        """Build a preset architecture: one of ``cifar10``, ``celebahq``, ``mnist``, ``digits``."""
        if name not in PRESETS:
            raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
        return cls(PRESETS[name], **overrides)

    @staticmethod
    def _run_stage(stage: nn.Module, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        if isinstance(stage, nn.ModuleDict):
            h = stage["res"](h, temb)
            return stage["attn"](h) if "attn" in stage else h
        return stage(h)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Predict the noise in ``x`` (``[B, C, H, W]``) at integer timesteps ``t`` (``[B]``)."""
        c = self.config
        if x.dim() != 4 or x.shape[1] != c.in_channels or x.shape[-1] % 2 ** (len(c.ch_mult) - 1) \
                or x.shape[-2] % 2 ** (len(c.ch_mult) - 1):
            raise ValueError(f"x: expected [B, {c.in_channels}, H, W] with H and W divisible by "
                             f"{2 ** (len(c.ch_mult) - 1)}, got {tuple(x.shape)}")
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if c.center_input_sample:
            x = 2 * x - 1
        temb = self.temb(timestep_embedding(t, c.ch, c.flip_sin_to_cos, c.freq_shift).to(x.dtype))
        hs = [self.conv_in(x)]
        for stage in self.down:
            hs.append(self._run_stage(stage, hs[-1], temb))
        h = self.mid2(self.mid_attn(self.mid1(hs[-1], temb)), temb)
        for stage in self.up:
            if isinstance(stage, nn.ModuleDict):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run_stage(stage, h, temb)
        return self.conv_out(self.norm_out(h))

    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters())
