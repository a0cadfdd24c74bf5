"""Colour coupling: p_θ(x_{k−1} | x_k) with the three channels of each pixel correlated.

The reverse step's variance models the error of the mean: per dimension σ² = β̃_k + E, where
E = c_k² e(τ_k) · exp(s) (``VarianceType.LEARNED``; s = 0 for ``CALIBRATED``) stands for
c_k² times the expected square of the x̂_0 error. The errors of a pixel's three channels are not
independent (a wrong guess of the brightness is wrong in R, G and B alike), so p can be a
Gaussian with a 3 × 3 covariance per pixel:

    Σ_ii = σ_i²,   Σ_ij = ρ_ij(τ_k) · √(E_i E_j)   (i ≠ j)

where ρ(t) — three numbers per network step t, the pairs (R,G), (R,B), (G,B) — is the
correlation of the x̂_0 error standardised by the variance head. The q noise (β̃) is
independent across channels, which is why only the error part is coupled; the same ρ(t) then
serves any chain. The coder codes a step channel by channel, each conditioned on the channels
before it (``conditional``): R with N(μ_R, σ_R²), G given R's standardised residual, B given
both. With ρ = 0 it is the factorised p.

ρ is the file's, not the model's: the encoder measures it on the images it codes, one network
call per unit at each of the ``ANCHORS`` steps (``estimate``: +7 % of the encoder's network
time at K = 100), and states it in the header as integers in 1/256 (21 numbers); between
anchors ρ is linear in t, above the last it stays (``table``). Measured on training crops
instead, it did not transfer: ρ(1) ≈ 0.40 on 64 training crops (wallpapers reduced 4×: their
channel noise averaged together) against 0.16 on the held-out photos' units (camera noise,
independent per channel), and the bound of the held-out crops with the training table rose
from 3.8876 to 3.9497 bits/dim (half the 64×64 units, K = 100, flips h).

Measured on the four held-out 256×256 crops in 64×64 units (K = 100, flips h, the same noise):
the bound falls from 3.8486 to 3.8156 bits/dim with the file's ρ at the 7 anchors (``nll
--coupling``), about half in the decoder L_0 (2.182 → 2.163), half in the first diffusion steps
(a ρ fitted at every chain step: 3.8118); ρ is about 0.17 for each pair at t = 1 and grows with
t (0.37 at t = 5, 0.58 at 20). Coded, astronaut + coffee: 3.6605 → 3.6365 bits/dim. Grouping pixels by their predicted
σ, their gradient or their saturation and fitting ρ per group added < 0.001, so one ρ per
step is kept. (Predicting each pixel from its already-coded neighbours as well — a
checkerboard order — was estimated at another ≈ 0.02 at t = 1: not built.)

Only arithmetic the coder can repeat to the bit: + − × ÷ and √ in float64.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

PAIRS = ((0, 1), (0, 2), (1, 2))
MIN_EIG = 0.05  # ρ is shrunk until its 3 × 3 correlation matrix has no eigenvalue below this


def _sqrt(x):
    return torch.sqrt(x) if isinstance(x, torch.Tensor) else np.sqrt(x)


def rho_at(rho_t: np.ndarray, sched, k: torch.Tensor) -> tuple:
    """ρ of each image's step k (network step τ_k; ``rho_t`` a ``table``) as three [B, 1, 1] float64 tensors."""
    rho = torch.from_numpy(np.asarray(rho_t, dtype=np.float64)[sched.timesteps[k.cpu().numpy()]])
    return tuple(rho[:, i].reshape(-1, 1, 1) for i in range(3))


def pair_correlations(var, err, rho) -> tuple:
    """The per-pixel correlations (r01, r02, r12) of Σ for one step: ``var`` σ² and ``err`` E of
    the three channels, shaped [..., 3, *]; ``rho`` the step's three ρ. Each r = ρ √(E_i E_j) / (σ_i σ_j)."""
    sc = _sqrt(err / var)
    s0, s1, s2 = sc[:, 0], sc[:, 1], sc[:, 2]
    return rho[0] * s0 * s1, rho[1] * s0 * s2, rho[2] * s1 * s2


def conditional_weights(r: tuple) -> tuple:
    """For the pair correlations ``r``: the weights of z_0 in G's conditional mean, (of z_0, z_1) in
    B's, and each channel's conditional variance as a fraction of its σ²."""
    r01, r02, r12 = r
    den = 1.0 - r01 * r01
    a = (r02 - r12 * r01) / den
    b = (r12 - r02 * r01) / den
    return (r01,), (a, b), (None, den, 1.0 - a * r02 - b * r12)


def conditional(c: int, mean, std, r: tuple, z: list):
    """Mean and standard deviation of channel ``c`` given the standardised residuals
    z_j = (x_j − μ_j) / σ_j of the channels before it (``z[:c]``); ``mean``/``std`` [:, 3, *]."""
    if c == 0:
        return mean[:, 0], std[:, 0]
    w1, w2, f = conditional_weights(r)
    w = (w1, w2)[c - 1]
    shift = w[0] * z[0] if c == 1 else w[0] * z[0] + w[1] * z[1]
    return mean[:, c] + std[:, c] * shift, std[:, c] * _sqrt(f[c])


def expected_kl(q_mean: torch.Tensor, q_var: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                err: torch.Tensor, rho) -> torch.Tensor:
    """KL(q ‖ p) per pixel, nats [B, H, W], for q = N(q_mean, q_var I) (factorised) and p the
    coupled Gaussian of this step; by the chain rule, Σ_c E_q KL(q_c ‖ p(x_c | x_<c))."""
    std = torch.sqrt(var)
    r = pair_correlations(var, err, rho)
    w1, w2, f = conditional_weights(r)
    zbar = (q_mean - mean) / std  # E_q z_j
    zvar = q_var / var  # Var_q z_j (q_var broadcasts)
    total = 0.0
    for c, w in ((0, ()), (1, w1), (2, w2)):
        m, v = mean[:, c], var[:, c]
        spread = 0.0
        for j, wj in enumerate(w):
            m = m + std[:, c] * wj * zbar[:, j]
            spread = spread + wj * wj * zvar[:, j]
        if c:
            v = v * f[c]
        qv = q_var[:, c] if q_var.shape[1] == 3 else q_var[:, 0]
        # E_q (x_c − m(z))² with z random: the mean's miss plus σ_c² Σ w_j² Var z_j
        total = total + 0.5 * (torch.log(v) - torch.log(qv) + (qv + (m - q_mean[:, c]) ** 2 + var[:, c] * spread) / v - 1.0)
    return total


ANCHORS = (1, 2, 4, 8, 16, 32, 64)  # the network steps t whose ρ a file states (format: never change)
SCALE = 256  # ρ in the header: integers in 1/256
MIN_DIMS = 49_152  # encoders couple files of at least this many values by default (the header's ρ: ≈ 50 bytes)


def shrink(rho) -> np.ndarray:
    """ρ [3] scaled towards 0 until its correlation matrix's smallest eigenvalue is ≥ MIN_EIG."""
    rho = np.asarray(rho, dtype=np.float64)
    while _min_eig(rho) < MIN_EIG:
        rho = rho * 0.95
    return rho


def _min_eig(rho) -> float:
    R = np.eye(3)
    for (i, j), v in zip(PAIRS, rho):
        R[i, j] = R[j, i] = v
    return float(np.linalg.eigvalsh(R)[0])


def check(stated) -> np.ndarray:
    """A header's ρ — ``len(ANCHORS)`` rows of three integers in 1/256 — as int64 [A, 3]; ValueError
    unless each row is a correlation matrix (positive definite)."""
    a = np.asarray(stated)
    if a.shape != (len(ANCHORS), 3) or a.dtype.kind not in "iu" or np.any(np.abs(a) >= SCALE):
        raise ValueError(f"colour coupling must be {len(ANCHORS)} rows of 3 integers in (−{SCALE}, {SCALE})")
    a = a.astype(np.int64)
    if any(_min_eig(row / SCALE) <= 0.0 for row in a):
        raise ValueError("colour coupling: a ρ that is no correlation matrix")
    return a


def table(stated, T: int) -> np.ndarray:
    """ρ(t) for t = 0 … T, [T+1, 3] float64, from a file's stated anchors: linear in t between them,
    the last one's above it (+ − × ÷ only: both sides compute the same bits)."""
    a = check(stated) / SCALE
    out = np.zeros((max(T, ANCHORS[-1]) + 1, 3))
    out[ANCHORS[-1]:] = a[-1]
    for (t0, r0), (t1, r1) in zip(zip(ANCHORS, a), zip(ANCHORS[1:], a[1:])):
        t = np.arange(t0, t1, dtype=np.float64)[:, None]
        out[t0:t1] = r0 + (r1 - r0) * ((t - t0) / (t1 - t0))
    return out[:T + 1]


def anchor_errors(net, sched, units: list[np.ndarray], batch: int, gen: torch.Generator,
                  progress: Callable[[int], None] | None = None, tags: list[np.ndarray] | None = None):
    """For each anchor t ≤ the schedule's length and each batch of the units (uint8 [n, C, h, w]
    arrays, one per shape): (t, x_0, err, exp(s) or None, tag), with x_t drawn from q at network
    step t of the model's full schedule ``sched`` (one draw per unit), err = clipped x̂_0 − x_0,
    float64 [b, C, h, w], and tag the batch's part of ``tags`` (one array per shape, one entry per
    unit; None without): the draws a file's ρ and its variance fit (``varscale``) are measured on."""
    from .data import to_model_space
    from .diffusion import exp_s, net_timesteps, predict_x0, q_sample, split_output

    for t in ANCHORS:
        if t > sched.K:
            return
        for g, u8 in enumerate(units):
            for i in range(0, len(u8), batch):
                x0 = to_model_space(u8[i:i + batch].transpose(0, 2, 3, 1))
                k = torch.full((x0.shape[0],), t, dtype=torch.int64)
                xt = q_sample(sched, x0, k, torch.randn(x0.shape, generator=gen))
                with torch.no_grad():
                    eps, s = split_output(net(xt, net_timesteps(sched, k)), x0.shape[1])
                err = predict_x0(sched, xt, k, eps).clamp(-1, 1).double() - x0.double()
                yield t, x0.double(), err, None if s is None else exp_s(s), None if tags is None else tags[g][i:i + batch]
                if progress:
                    progress(len(x0))


class RhoFit:
    """The ρ a file states, from ``anchor_errors``' draws: at each anchor t, the correlation between
    channel pairs of the clipped x̂_0 error over all the file's pixels, each error divided by
    √exp(s) (the variance head's scale, if the network has one); shrunk to a correlation matrix
    with no eigenvalue below MIN_EIG and rounded to 1/256 (``rows``)."""

    def __init__(self):
        self.m: dict[int, torch.Tensor] = {}

    def add(self, t: int, x0: torch.Tensor, err: torch.Tensor, es: torch.Tensor | None) -> None:
        if es is not None:
            err = err / torch.sqrt(es)
        v = err.transpose(0, 1).reshape(err.shape[1], -1)
        self.m[t] = self.m.get(t, torch.zeros(3, 3, dtype=torch.float64)) + v @ v.T

    def rows(self) -> list[list[int]]:
        rows = []
        for t in ANCHORS:
            if t not in self.m:  # a schedule shorter than the anchor
                rows.append(rows[-1] if rows else [0, 0, 0])
                continue
            m = self.m[t]
            d = torch.sqrt(torch.diag(m))
            rho = shrink([float(m[i, j] / (d[i] * d[j])) if d[i] * d[j] > 0 else 0.0 for i, j in PAIRS])
            rows.append([int(v) for v in np.round(rho * SCALE)])
        check(rows)
        return rows


def estimate(net, sched, units: list[np.ndarray], batch: int, gen: torch.Generator,
             progress: Callable[[int], None] | None = None) -> list[list[int]]:
    """The ρ a file states (``RhoFit``), measured on its own units (uint8 [n, 3, h, w] arrays, one
    per shape), one draw of x_t per unit at each anchor. ``sched``: the model's full schedule. Encoder only."""
    fit = RhoFit()
    for t, x0, err, es, _ in anchor_errors(net, sched, units, batch, gen, progress):
        fit.add(t, x0, err, es)
    return fit.rows()
