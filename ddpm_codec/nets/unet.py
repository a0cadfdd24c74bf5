"""The ε-network: a small DDPM-style U-Net for 28×28 and 32×32 images.

Sinusoidal time embedding, residual blocks with GroupNorm, optional single-head
self-attention at the lowest resolution (Ho et al. 2020, appendix B, scaled down
for a 2-core CPU).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
import torch.nn.functional as F


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 1
    image_size: int = 28
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attn_levels: tuple[int, ...] = (2,)  # levels (0 = full resolution) that get self-attention
    dropout: float = 0.0
    groups: int = 8
    # a second output of C channels, s: the log-scale of each pixel's x̂_0 error against the
    # calibration (``diffusion.LearnedVariance``); zero-initialised, so s = 0 is the calibrated σ²
    learn_sigma: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["learn_sigma"]:  # absent unless set: older checkpoints (and their model ids) stay as they were
            del d["learn_sigma"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        d = dict(d)
        d["channel_mult"] = tuple(d["channel_mult"])
        d["attn_levels"] = tuple(d["attn_levels"])
        return cls(**d)


# 0.69M, 2.2M and 8.9M parameters at 28×28 grey (`ddpm-codec bench net` prints them).
PRESETS: dict[str, dict] = {
    "S": dict(base_channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, attn_levels=(2,)),
    "M": dict(base_channels=24, channel_mult=(1, 2, 4), num_res_blocks=2, attn_levels=(2,)),
    "L": dict(base_channels=48, channel_mult=(1, 2, 4), num_res_blocks=2, attn_levels=(2,)),
}


def preset_config(size: str, in_channels: int, image_size: int, dropout: float = 0.0) -> UNetConfig:
    if size not in PRESETS:
        raise ValueError(f"unknown preset {size!r}; choose one of {', '.join(PRESETS)}")
    if image_size % 4 != 0:
        raise ValueError("image size must be divisible by 4 (two downsamplings)")
    return UNetConfig(in_channels=in_channels, image_size=image_size, dropout=dropout, **PRESETS[size])


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (float) timesteps t [B] -> [B, dim] (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (half - 1))
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)
        w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(C), dim=-1)
        h = torch.einsum("bij,bcj->bci", w, v).reshape(B, C, H, W)
        return x + self.proj(h)


class UNet(nn.Module):
    """ε_θ(x_t, t): [B, C, H, W] × [B] -> [B, C, H, W]; with ``learn_sigma`` [B, 2C, H, W], ε then s."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch, g = cfg.base_channels, cfg.groups
        temb = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        levels = len(cfg.channel_mult)
        self.down = nn.ModuleList()
        skips = [ch]
        cur = ch
        for lvl, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                blocks = [ResBlock(cur, ch * mult, temb, g, cfg.dropout)]
                cur = ch * mult
                if lvl in cfg.attn_levels:
                    blocks.append(AttnBlock(cur, g))
                self.down.append(nn.ModuleList(blocks))
                skips.append(cur)
            if lvl != levels - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(cur, cur, 3, stride=2, padding=1)]))
                skips.append(cur)
        self.mid = nn.ModuleList([ResBlock(cur, cur, temb, g, cfg.dropout), AttnBlock(cur, g),
                                  ResBlock(cur, cur, temb, g, cfg.dropout)])
        self.up = nn.ModuleList()
        for lvl in reversed(range(levels)):
            mult = cfg.channel_mult[lvl]
            for i in range(cfg.num_res_blocks + 1):
                blocks = [ResBlock(cur + skips.pop(), ch * mult, temb, g, cfg.dropout)]
                cur = ch * mult
                if lvl in cfg.attn_levels:
                    blocks.append(AttnBlock(cur, g))
                if lvl != 0 and i == cfg.num_res_blocks:
                    blocks.append(nn.Upsample(scale_factor=2, mode="nearest"))
                    blocks.append(nn.Conv2d(cur, cur, 3, padding=1))
                self.up.append(nn.ModuleList(blocks))
        assert not skips
        self.norm_out = nn.GroupNorm(g, cur)
        self.conv_out = nn.Conv2d(cur, cfg.in_channels * (2 if cfg.learn_sigma else 1), 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @staticmethod
    def _run(blocks: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for b in blocks:
            h = b(h, emb) if isinstance(b, ResBlock) else b(h)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.temb(timestep_embedding(t, self.cfg.base_channels))
        h = self.conv_in(x)
        hs = [h]
        for blocks in self.down:
            h = self._run(blocks, h, emb)
            hs.append(h)
        h = self._run(self.mid, h, emb)
        for blocks in self.up:
            h = self._run(blocks, torch.cat([h, hs.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


def widen_for_sigma(state: dict, cfg: UNetConfig) -> dict:
    """The state of a network without ``learn_sigma`` as one with it: ε unchanged, the new s
    channels of ``conv_out`` zero (s = 0: the calibrated variance)."""
    state = dict(state)
    for name in ("conv_out.weight", "conv_out.bias"):
        w = state[name]
        if w.shape[0] != cfg.in_channels:
            raise ValueError("the state already has a second output")
        state[name] = torch.cat([w, torch.zeros_like(w)], dim=0)
    return state


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
