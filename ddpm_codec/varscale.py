"""The file's own variance fit: p_θ's x̂_0-error variance refitted to the images a file codes.

The reverse step's variance is σ² = β̃_k + E per dimension, E = c_k² e(τ_k) · exp(s) the model's
estimate of the x̂_0 error (``VarianceType.LEARNED``; s = 0 for ``CALIBRATED``), with e(t)
measured on training crops. On images unlike those crops the estimate is off — on the four
held-out photos' 64×64 units (K = 100, no flips) the x̂_0 error is 1.3–1.5× E at t = 1, about
2× at t = 5 and 3–7× from t = 30 on, per channel — and p's variance is too small. Camera noise
also puts a floor under the error that the model, trained on photos reduced 4×, never saw. A
file states its own correction: per channel c and network step t,

    σ² = β̃_k + v_c(τ_k) · E + c_k² a_c(τ_k)

with the scale v and the floor a (in x̂_0 units) fitted by the encoder on the file's images at
the ``ANCHORS`` (the coupling's t = 1, 2, 4 … 64; ``Fit``), stated in the header as integers
(v in 1/256, a in 1/256 of a pixel level squared), linear in t between anchors and the last
one's above (``table``). Only the error part changes, so p's variance never falls below q's
β̃, and the coupling (``coupling``) applies on top: its ρ correlates the refitted errors.

The fit, per anchor and channel, minimises the cost the file will pay: at the file's chain step
k whose τ_k is nearest t, KL(q ‖ p) summed over the file's values for k ≥ 2 (with q's β̃_k) and
the discretized decoder's −log p for k = 1 — v alone first, then a and v in turn (golden
section; v in [1/16, 64]). It reuses the coupling's draws: no network calls of its own.

Measured on the four held-out 256×256 crops (64×64 units, K = 100, no flips, one draw per
step): v fitted at every chain step per channel on the same draw takes the bound from 3.8714 to
3.8300 bits/dim, most of it at the smallest t (decoder −0.020, t = 2 … 5 −0.015); at t = 1 … 8,
the floor adds another −0.029 (−0.025 in the decoder), as much as 8 scales per channel for 8
bands of E did (a scale and floor for each of 8 bands of x̂_0's brightness: −0.007 more, not
built). With the shipped defaults (flips h, coupling; ``nll --fit-variance``): 3.8156 → 3.7671
with v alone, 3.7473 with the floor. Images differ (camera, processing), so each image of at
least MIN_DIMS values gets its own fit (``assign``; the smaller ones share one): 3.7470 →
3.7366 against one fit for the four (the same noise; each image's own ρ as well: 3.7350, not
built).

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
FLOOR_UNIT = (2.0 / 255.0) ** 2 / 256  # the floor in the header: integers in 1/256 of a pixel level squared
FLOOR_MAX = 65_535  # ≈ 256 levels²: a standard deviation of 16 levels
MIN_DIMS = 49_152  # encoders fit files of at least this many values by default (header: 7·2C numbers)
FIT_VALUES = 1 << 18  # the encoder fits each anchor and channel on at most this many of the file's values


def check(stated, channels: int) -> np.ndarray:
    """A header's variance fit — ``len(ANCHORS)`` rows of 2·``channels`` integers: each channel's
    scale v in 1/256, in [SCALE·V_MIN, SCALE·V_MAX], then each channel's floor in FLOOR_UNITs, in
    [0, FLOOR_MAX] — as int64 [A, 2C]; ValueError otherwise."""
    a = np.asarray(stated)
    if a.shape != (len(ANCHORS), 2 * channels) or a.dtype.kind not in "iu":
        raise ValueError(f"the variance fit must be {len(ANCHORS)} rows of {2 * channels} integers")
    if np.any(a[:, :channels] < SCALE * V_MIN) or np.any(a[:, :channels] > SCALE * V_MAX):
        raise ValueError(f"a variance scale outside [{V_MIN}, {V_MAX:g}]")
    if np.any(a[:, channels:] < 0) or np.any(a[:, channels:] > FLOOR_MAX):
        raise ValueError(f"a variance floor outside [0, {FLOOR_MAX}]")
    return a.astype(np.int64)


def table(stated, T: int, channels: int) -> np.ndarray:
    """(v(t), a(t)) for t = 0 … T, [T+1, 2C] float64 (a in model units: x_0 in [−1, 1]), from a
    file's stated anchors: linear in t between them, the last one's above it, the first one's
    below (+ − × ÷ only)."""
    a = check(stated, channels) * np.concatenate([np.full(channels, 1.0 / SCALE), np.full(channels, FLOOR_UNIT)])
    out = np.zeros((max(T, ANCHORS[-1]) + 1, 2 * channels))
    out[:ANCHORS[0]] = a[0]
    out[ANCHORS[-1]:] = a[-1]
    for (t0, v0), (t1, v1) in zip(zip(ANCHORS, a), zip(ANCHORS[1:], a[1:])):
        t = np.arange(t0, t1, dtype=np.float64)[:, None]
        out[t0:t1] = v0 + (v1 - v0) * ((t - t0) / (t1 - t0))
    return out[:T + 1]


def apply(var: torch.Tensor, beta_tilde: torch.Tensor, coef: torch.Tensor, fit: torch.Tensor) -> torch.Tensor:
    """σ² with its error part refitted: β̃ + v · (σ² − β̃) + c_k² a; ``fit`` [B, 2C, 1, 1] (v, a),
    ``coef`` c_k, the x̂_0 coefficient of the step's posterior mean."""
    C = fit.shape[1] // 2
    return beta_tilde + (var - beta_tilde) * fit[:, :C] + coef * coef * fit[:, C:]


def tables(fits: list, T: int, channels: int) -> np.ndarray:
    """A file's fits (each as ``table`` takes it) as [F, T+1, 2C]."""
    return np.stack([table(f, T, channels) for f in fits])


def assign(sizes: list[int]) -> list[int]:
    """Which fit each of a file's images (of ``sizes`` values) gets: its own for images of at least
    MIN_DIMS values, one shared by the others (fit 0) — all share one if none is that large."""
    big = [s >= MIN_DIMS for s in sizes]
    if len(sizes) == 1 or not any(big):
        return [0] * len(sizes)
    out, n = [], 0 if all(big) else 1
    for b in big:
        out.append(n if b else 0)
        n += b
    return out


def at(scale: np.ndarray, sched, k: torch.Tensor) -> torch.Tensor:
    """Each image's (v, a) at its step k as [B, 2C, 1, 1] float64: ``scale`` one ``table`` for all,
    or [B, T+1, 2C], one per image."""
    ts = sched.timesteps[k.cpu().numpy()]
    scale = np.asarray(scale, dtype=np.float64)
    v = scale[ts] if scale.ndim == 2 else scale[np.arange(len(ts)), ts]
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
            fits = [fit_pair(lambda v, a: cost(c, v, a)) for c in range(self.C)]
            self.fitted[self.t] = ([int(round(SCALE * v)) for v, _ in fits]
                                   + [min(FLOOR_MAX, int(round(a / FLOOR_UNIT))) for _, a in fits])
        self.t, self.parts = None, []

    def _cost(self, t: int, x0: torch.Tensor, err: torch.Tensor, var: torch.Tensor) -> Callable:
        """cost(c, v, a): what channel c's values pay at the chain step nearest t with scale v and
        floor a, nats (constants dropped); on at most FIT_VALUES values, evenly strided."""
        from .likelihood import discretized_gaussian_log_prob

        step = max(1, -(-x0.shape[1] // FIT_VALUES))
        x0, err, var = x0[:, ::step], err[:, ::step], var[:, ::step]
        k = int(np.argmin(np.abs(self.chain.timesteps[1:] - t))) + 1
        if k == 1:  # the decoder: x_0 under N(x̂_0, v E + a) integrated over its bin
            def cost(c, v, a):
                return float(-discretized_gaussian_log_prob(x0[c], x0[c] + err[c], torch.sqrt(v * var[c] + a)).sum())
            return cost
        # KL(q ‖ p) per dimension in x̂_0 units (divided by c_k², constants dropped): q's variance r = β̃_k / c_k²
        r = float(self.chain.beta_tilde[k] / self.chain.post_coef_x0[k] ** 2)

        def cost(c, v, a):
            p = r + v * var[c] + a
            return float(0.5 * (torch.log(p) + (r + err[c] ** 2) / p).sum())
        return cost

    def rows(self) -> list[list[int]]:
        """The stated fit: ``len(ANCHORS)`` rows of 2C integers (``check``)."""
        self._finish()
        out = []
        for t in ANCHORS:
            out.append(self.fitted[t] if t in self.fitted else out[-1] if out else [SCALE] * self.C + [0] * self.C)
        check(out, self.C)
        return out


def fit_pair(cost: Callable[[float, float], float], rounds: int = 3) -> tuple[float, float]:
    """(v, a) minimising cost(v, a): v alone with a = 0 first, then a and v in turn."""
    v, a = golden(lambda x: cost(x, 0.0)), 0.0
    a_max = FLOOR_MAX * FLOOR_UNIT
    for _ in range(rounds):
        a = golden(lambda u: cost(v, u * u), 0.0, math.sqrt(a_max), log=False) ** 2
        v = golden(lambda x: cost(x, a))
    return v, a


def golden(f: Callable[[float], float], lo: float = V_MIN, hi: float = V_MAX, iters: int = 32,
           log: bool = True) -> float:
    """The x in [lo, hi] minimising f (unimodal), by golden-section search on log x (or on x)."""
    fwd, back = (math.log, math.exp) if log else (float, float)
    a, b = fwd(lo), fwd(hi)
    g = (math.sqrt(5.0) - 1.0) / 2.0
    x1, x2 = b - g * (b - a), a + g * (b - a)
    f1, f2 = f(back(x1)), f(back(x2))
    for _ in range(iters):
        if f1 <= f2:
            b, x2, f2 = x2, x1, f1
            x1 = b - g * (b - a)
            f1 = f(back(x1))
        else:
            a, x1, f1 = x1, x2, f2
            x2 = a + g * (b - a)
            f2 = f(back(x2))
    return min(max(back((a + b) / 2.0), lo), hi)
