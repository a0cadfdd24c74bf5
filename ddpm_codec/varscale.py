"""The file's own variance scale: p_θ's x̂_0-error variance refitted to the images a file codes.

The reverse step's variance is σ² = β̃_k + E per dimension, E = c_k² e(τ_k) · exp(s) the model's
estimate of the x̂_0 error (``VarianceType.LEARNED``; s = 0 for ``CALIBRATED``), with e(t)
measured on training crops. On images unlike those crops the estimate is off — on the four
held-out photos' 64×64 units (K = 100, no flips) the x̂_0 error is 1.3–1.5× E at t = 1, about
2× at t = 5 and 3–7× from t = 30 on, per channel — and p's variance is too small. A file can
state its own correction: per channel and network step t,

    σ² = β̃_k + v_c(τ_k) · E

with v(t) the scale the encoder fitted on the file's images at the ``ANCHORS`` (the coupling's
t = 1, 2, 4 … 64; ``estimate``), stated in the header as integers in 1/256, linear in t
between anchors and the last one's above (``table``). v multiplies only the error part, so
p's variance never falls below q's β̃, and the coupling (``coupling``) applies on top of it:
its ρ correlates the scaled errors.

The fit, per anchor and channel, minimises the cost the scale will pay: at the file's chain step
k whose τ_k is nearest t, KL(q ‖ p) summed over the file's values for k ≥ 2 (with q's β̃_k) and
the discretized decoder's −log p for k = 1, over v in [1/16, 64] (golden section on log v).
It reuses the coupling's draws: no network calls of its own.

Measured on the four held-out 256×256 crops (64×64 units, K = 100, no flips, one draw per
step): the bound 3.8714 → 3.8300 bits/dim with v fitted at every chain step per channel on the
same draw (3.8324 with one v for all channels) — most of it at the smallest t (decoder −0.020,
t = 2 … 5 −0.015).

Only arithmetic the coder can repeat to the bit: + − × ÷ in float64.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from .coupling import ANCHORS

SCALE = 256  # v in the header: integers in 1/256
V_MIN, V_MAX = 1.0 / 16.0, 64.0  # the range the encoder fits v in
MIN_DIMS = 49_152  # encoders fit files of at least this many values by default (header: ≈ 7·C numbers)


def check(stated, channels: int) -> np.ndarray:
    """A header's variance scale — ``len(ANCHORS)`` rows of ``channels`` integers in 1/256, each
    in [SCALE·V_MIN, SCALE·V_MAX] — as int64 [A, C]; ValueError otherwise."""
    a = np.asarray(stated)
    if a.shape != (len(ANCHORS), channels) or a.dtype.kind not in "iu":
        raise ValueError(f"the variance scale must be {len(ANCHORS)} rows of {channels} integers")
    if np.any(a < SCALE * V_MIN) or np.any(a > SCALE * V_MAX):
        raise ValueError(f"a variance scale outside [{V_MIN}, {V_MAX:g}]")
    return a.astype(np.int64)


def table(stated, T: int, channels: int) -> np.ndarray:
    """v(t) for t = 0 … T, [T+1, C] float64, from a file's stated anchors: linear in t between
    them, the last one's above it, the first one's below (+ − × ÷ only)."""
    a = check(stated, channels) / SCALE
    out = np.zeros((max(T, ANCHORS[-1]) + 1, channels))
    out[:ANCHORS[0]] = a[0]
    out[ANCHORS[-1]:] = a[-1]
    for (t0, v0), (t1, v1) in zip(zip(ANCHORS, a), zip(ANCHORS[1:], a[1:])):
        t = np.arange(t0, t1, dtype=np.float64)[:, None]
        out[t0:t1] = v0 + (v1 - v0) * ((t - t0) / (t1 - t0))
    return out[:T + 1]


def apply(var: torch.Tensor, beta_tilde: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """σ² with its error part scaled: β̃ + v · (σ² − β̃); ``v`` [B, C, 1, 1]."""
    return beta_tilde + (var - beta_tilde) * v


def at(scale: np.ndarray, sched, k: torch.Tensor) -> torch.Tensor:
    """Each image's v at its step k (``scale`` a ``table``) as [B, C, 1, 1] float64."""
    v = np.asarray(scale, dtype=np.float64)[sched.timesteps[k.cpu().numpy()]]
    return torch.from_numpy(v).reshape(v.shape[0], v.shape[1], 1, 1)


# --- the encoder's measurement ----------------------------------------------------------------

class Fit:
    """Collects ``coupling.anchor_errors``' draws and fits v per anchor and channel (``rows``),
    each anchor once its draws are in (one anchor's errors in memory at a time). ``e``: the e(t)
    table [T+1] the variance is built on; ``chain``: the file's K-step chain."""

    def __init__(self, e: np.ndarray, chain, channels: int):
        self.e, self.chain, self.C = np.asarray(e, dtype=np.float64), chain, channels
        self.fitted: dict[int, list[int]] = {}
        self.t, self.parts = None, []

    def add(self, t: int, x0: torch.Tensor, err: torch.Tensor, es: torch.Tensor | None) -> None:
        if t != self.t:
            self._finish()
            self.t = t
        var = self.e[t] * (es.double() if es is not None else torch.ones_like(err))
        self.parts.append(tuple(a.transpose(0, 1).reshape(self.C, -1) for a in (x0, err, var)))  # [C, values]

    def _finish(self) -> None:
        if self.t is not None and self.parts:
            cost = self._cost(self.t, *(torch.cat(p, 1) for p in zip(*self.parts)))
            self.fitted[self.t] = [int(round(SCALE * golden(lambda v: cost(c, v)))) for c in range(self.C)]
        self.t, self.parts = None, []

    def _cost(self, t: int, x0: torch.Tensor, err: torch.Tensor, var: torch.Tensor) -> Callable[[int, float], float]:
        """cost(c, v): what channel c's values pay at the chain step nearest t with scale v, nats."""
        from .likelihood import discretized_gaussian_log_prob

        k = int(np.argmin(np.abs(self.chain.timesteps[1:] - t))) + 1
        if k == 1:  # the decoder: x_0 under N(x̂_0, v E) integrated over its bin
            def cost(c, v):
                return float(-discretized_gaussian_log_prob(x0[c], x0[c] + err[c], torch.sqrt(v * var[c])).sum())
            return cost
        # KL(q ‖ p) per dimension in x̂_0 units (divided by c_k², constants dropped): q's variance r = β̃_k / c_k²
        r = float(self.chain.beta_tilde[k] / self.chain.post_coef_x0[k] ** 2)

        def cost(c, v):
            p = r + v * var[c]
            return float(0.5 * (torch.log(p) + (r + err[c] ** 2) / p).sum())
        return cost

    def rows(self) -> list[list[int]]:
        """The stated v: ``len(ANCHORS)`` rows of C integers in 1/256."""
        self._finish()
        out = []
        for t in ANCHORS:
            out.append(self.fitted[t] if t in self.fitted else out[-1] if out else [SCALE] * self.C)
        check(out, self.C)
        return out


def golden(f: Callable[[float], float], lo: float = V_MIN, hi: float = V_MAX, iters: int = 40) -> float:
    """The v in [lo, hi] minimising f (unimodal in log v), by golden-section search on log v."""
    a, b = math.log(lo), math.log(hi)
    g = (math.sqrt(5.0) - 1.0) / 2.0
    x1, x2 = b - g * (b - a), a + g * (b - a)
    f1, f2 = f(math.exp(x1)), f(math.exp(x2))
    for _ in range(iters):
        if f1 <= f2:
            b, x2, f2 = x2, x1, f1
            x1 = b - g * (b - a)
            f1 = f(math.exp(x1))
        else:
            a, x1, f1 = x1, x2, f2
            x2 = a + g * (b - a)
            f2 = f(math.exp(x2))
    return min(max(math.exp((a + b) / 2.0), lo), hi)
