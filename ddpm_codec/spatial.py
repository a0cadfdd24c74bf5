"""A checkerboard decoder: the pixels of L_0 coded in two phases, the second given the first.

The decoder p_θ(x_0 | x_1) is a discretized Gaussian per value (with coupled colour channels,
per pixel: R, then G given R, then B given both — ``coupling``). Its errors are also correlated
between neighbouring pixels: the network's x̂_0 misses smooth structure that a pixel's
neighbours show. The pixels of each unit are therefore split like a checkerboard: phase A (row +
column even) is coded first, as before; each pixel of phase B (row + column odd), all of whose
4-neighbours in the unit are phase A, is coded with its mean shifted by what those neighbours
missed:

    u_j     = (x_j − m_j) / s_j                 standardised residual of an A pixel's channel
    n       = mean of u_j over the B pixel's neighbours in the unit (2, 3 or 4 of them)
    m'      = m + s · w_c · n,   s' = s · √f_c  for the B pixel's channel c

where (m, s) is the value's distribution before (the coupled conditional, or the plain one), and
(w_c, f_c) per channel are the file's: the encoder fits them on its own units — one draw of x_1
per unit, the draw ``coupling.anchor_errors`` makes at t = 1 — by minimising what phase B pays
(``estimate``), and states them in the header as 2C integers in 1/256 (``check``). Only the
decoder step (k = 1) is split: the estimate for t = 2 … 20 of the chain was a tenth of t = 1's
each and falling.

Measured first (a script, the ``photos`` model of 3f95775d79414e83, four held-out 256×256 crops
in 64×64 units, flips h, no coupling or fit): neighbour correlation of the standardised
residuals 0.23, 0.22, 0.13 (R, G, B) at t = 1, 0.13 at t = 2, 0.05 at t = 10; the decoder term
−0.017 bits/dim with w, f fitted on the same draw. Built, with every other default (coupling,
the file's variance fit), same crops, same noise (``nll … --steps 100 --tile 64 --spatial`` /
``--no-spatial``): that model's bound 3.7473 → 3.7331, its successor's (1d2c7a8a9dde0161)
3.7001 → 3.6866 bits/dim, all of it in the decoder term; stated w ≈ 0.40, 0.40, 0.30 and
f ≈ 0.96, 0.96, 1. On the grey models it gains next to nothing (200 test images, K = 100:
MNIST 1.0218 → 1.0213, Fashion-MNIST 2.8037 → 2.8029), so the default splits only where the
colours are coupled (``codec.use_split``).

Both sides compute n, m' and s' with the same float64 + − × ÷ √ in the same order, so the
coder's probabilities agree to the bit.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .coupling import conditional

SCALE = 256  # w and f in the header: integers in 1/256
W_MAX = 2 * SCALE  # w in [0, 2]
F_MIN = SCALE // 16  # f in [1/16, 1]
MIN_DIMS = 49_152  # encoders split files of at least this many values by default (as the coupling)
FIT_UNITS = 256  # the encoder fits on at most this many of its units (evenly strided)


def check(stated, channels: int) -> np.ndarray:
    """A header's split: 2·``channels`` integers — each channel's w in 1/256, in [0, W_MAX], then
    each channel's f in 1/256, in [F_MIN, SCALE] — as int64 [2C]; ValueError otherwise."""
    a = np.asarray(stated)
    if a.shape != (2 * channels,) or a.dtype.kind not in "iu":
        raise ValueError(f"the checkerboard split must be {2 * channels} integers")
    if np.any(a[:channels] < 0) or np.any(a[:channels] > W_MAX):
        raise ValueError(f"a checkerboard weight outside [0, {W_MAX}]")
    if np.any(a[channels:] < F_MIN) or np.any(a[channels:] > SCALE):
        raise ValueError(f"a checkerboard variance factor outside [{F_MIN}, {SCALE}]")
    return a.astype(np.int64)


def weights(stated, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(w [C], f [C]) float64 from a header's integers."""
    a = check(stated, channels).astype(np.float64) / SCALE
    return a[:channels], a[channels:]


def phase_b(h: int, w: int) -> np.ndarray:
    """bool [h, w]: the pixels of phase B (row + column odd), coded second."""
    return (np.arange(h)[:, None] + np.arange(w)[None, :]) % 2 == 1


def neighbour_mean(u):
    """For every pixel, the mean of ``u`` over its 4-neighbours inside the unit: [..., h, w] ->
    [..., h, w] (numpy or torch, float64). Summed up, down, left, right, in that order, then divided
    by their number; for a phase-B pixel every neighbour is phase A."""
    lib = torch if isinstance(u, torch.Tensor) else np
    h, w = u.shape[-2:]
    total = lib.zeros_like(u)
    count = np.zeros((h, w))
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        ys, yd = (slice(0, h - 1), slice(1, h)) if dy == -1 else (slice(1, h), slice(0, h - 1)) if dy == 1 else (
            slice(None), slice(None))
        xs, xd = (slice(0, w - 1), slice(1, w)) if dx == -1 else (slice(1, w), slice(0, w - 1)) if dx == 1 else (
            slice(None), slice(None))
        total[..., yd, xd] = total[..., yd, xd] + u[..., ys, xs]
        count[yd, xd] += 1
    cnt = torch.from_numpy(count) if lib is torch else count
    return total / cnt


def channel_conditional(mean, std, r):
    """``conditional(c, z)`` -> channel c's (mean, std) given the standardised residuals ``z`` (a
    list) of the channels before it: the coupled conditional (``coupling.conditional``) for pair
    correlations ``r``, or for None each channel on its own. ``mean``, ``std``: [B, C, *] (numpy or
    torch)."""
    if r is None:
        return lambda c, z: (mean[:, c], std[:, c])
    return lambda c, z: conditional(c, mean, std, r, z)


def shifted(m, s, n, w: float, f: float):
    """Phase B's (mean, std) given its neighbours' mean residual ``n``: (m + s·w·n, s·√f)."""
    return m + s * (w * n), s * math.sqrt(f)


def pixel_nll(x0: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, conditional, stated) -> torch.Tensor:
    """−log p(x_0 | x_1) per value, nats [B, C, H, W], of the checkerboard decoder: ``conditional(c,
    z)`` gives channel c's (mean, std) [B, H, W] given the standardised residuals z (a list of [B,
    H, W]) of the channels before it (``coupling.conditional``, or the plain (mean[:, c], std[:, c])),
    ``stated`` the header's split. Mirrors ``ChainCoder``'s split decoder term for term."""
    from .likelihood import bin_edges, log_normal_interval

    C = x0.shape[1]
    w, f = weights(stated, C)
    z = (x0 - mean) / std
    lower, upper = bin_edges(x0)
    b = torch.from_numpy(phase_b(*x0.shape[2:]))
    out = torch.empty_like(x0)
    for c in range(C):
        m, s = conditional(c, [z[:, j] for j in range(c)])
        u = (x0[:, c] - m) / s
        mb, sb = shifted(m, s, neighbour_mean(u), w[c], f[c])
        m, s = torch.where(b, mb, m), torch.where(b, sb, s)
        out[:, c] = -log_normal_interval((lower[:, c] - m) / s, (upper[:, c] - m) / s)
    return out


def estimate(draws, channels: int, conditional_of) -> list[int]:
    """The split a file states: per channel, (w, f) minimising phase B's −log p of x_0 on the
    encoder's t = 1 draws. ``draws``: (x_0, mean, std) float64 [b, C, h, w] per batch (the
    decoder's distribution before the split, on at most FIT_UNITS units); ``conditional_of(mean,
    std)``: the ``conditional`` of ``pixel_nll`` for that batch."""
    from .likelihood import bin_edges, log_normal_interval
    from .varscale import golden

    parts = [[] for _ in range(channels)]  # per channel: (x_0, m, s, n) of phase-B values
    for x0, mean, std in draws:
        z = (x0 - mean) / std
        b = torch.from_numpy(phase_b(*x0.shape[2:]))
        cond = conditional_of(mean, std)
        for c in range(channels):
            m, s = cond(c, [z[:, j] for j in range(c)])
            n = neighbour_mean((x0[:, c] - m) / s)
            parts[c].append(tuple(a[:, b].reshape(-1) for a in (x0[:, c], m, s, n)))
    out_w, out_f = [], []
    for c in range(channels):
        x, m, s, n = (torch.cat(p) for p in zip(*parts[c]))
        lower, upper = bin_edges(x)

        def cost(w: float, f: float) -> float:
            mb, sb = shifted(m, s, n, w, f)
            return float(-log_normal_interval((lower - mb) / sb, (upper - mb) / sb).sum())

        w, f = 0.0, 1.0
        for _ in range(3):
            w = golden(lambda v: cost(v, f), 0.0, W_MAX / SCALE, log=False)
            f = golden(lambda v: cost(w, v), F_MIN / SCALE, 1.0, log=False)
        wi, fi = int(round(w * SCALE)), int(round(f * SCALE))
        if cost(wi / SCALE, fi / SCALE) >= cost(0.0, 1.0):  # no gain: state the plain decoder
            wi, fi = 0, SCALE
        out_w.append(wi)
        out_f.append(fi)
    out = out_w + out_f
    check(out, channels)
    return out
