"""The variational bound in bits/dim (Ho et al. 2020, eq. 5):

    L = L_T + Σ_{k=2}^{K} L_{k−1} + L_0
    L_T     = KL(q(x_K | x_0) ‖ N(0, I))                       "prior"
    L_{k−1} = KL(q(x_{k−1} | x_k, x_0) ‖ p_θ(x_{k−1} | x_k))   "diffusion" (summed)
    L_0     = −log p_θ(x_0 | x_1), discretized Gaussian (eq. 13) "decoder"

over any step subsequence (a respaced ``Schedule`` is the K-step chain). Computed
in float64; every function says whether it returns nats or bits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from .coupling import conditional, pair_correlations
from .coupling import expected_kl as coupled_kl
from .coupling import rho_at as coupling_rho
from .diffusion import (EpsNet, VarianceType, at, eps_of, model_variance, p_step, q_mean_var, q_posterior_mean_var,
                        q_sample)
from .schedule import Schedule

LN2 = math.log(2.0)
BIN = 1.0 / 255.0  # half the distance between two pixel levels in [-1, 1]


def normal_kl(mean1: torch.Tensor, var1: torch.Tensor, mean2: torch.Tensor, var2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, var1) ‖ N(mean2, var2)) per element, in nats."""
    return 0.5 * (torch.log(var2) - torch.log(var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1.0)


def _log1mexp(d: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(d)) for d ≤ 0, accurate on both sides of −ln 2 (Mächler 2012)."""
    return torch.where(d > -LN2, torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d)))


def log_normal_interval(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(Φ(b) − Φ(a)) for a < b (standard normal, ±inf allowed), exact in the tails, in nats."""
    flip = (a + b) > 0  # compute in the lower tail, where log Φ keeps its precision
    lo = torch.where(flip, -b, a)
    hi = torch.where(flip, -a, b)
    log_hi = torch.special.log_ndtr(hi)
    return log_hi + _log1mexp(torch.special.log_ndtr(lo) - log_hi)


def bin_edges(x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Edges of the pixel bin of each x_0 in [-1, 1]: x ± 1/255, the end bins open to ∓∞."""
    lower = torch.where(x0 < -1.0 + BIN, torch.full_like(x0, -math.inf), x0 - BIN)
    upper = torch.where(x0 > 1.0 - BIN, torch.full_like(x0, math.inf), x0 + BIN)
    return lower, upper


def discretized_gaussian_log_prob(x0: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log p(x_0) per element under N(mean, std²) integrated over x_0's pixel bin (eq. 13), nats."""
    lower, upper = bin_edges(x0)
    return log_normal_interval((lower - mean) / std, (upper - mean) / std)


def level_values(dtype=torch.float64) -> torch.Tensor:
    """The 256 pixel levels in [-1, 1]."""
    return torch.arange(256, dtype=dtype) * (2.0 / 255.0) - 1.0


def discretized_gaussian_log_probs(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log p of each of the 256 levels: [...] -> [..., 256], nats. Sums (in prob.) to 1."""
    levels = level_values(mean.dtype)
    return discretized_gaussian_log_prob(levels, mean[..., None], std[..., None])


@dataclass
class BoundTerms:
    """Per-image terms of the bound, each [B] in bits/dim."""

    prior: torch.Tensor  # L_T
    diffusion: torch.Tensor  # Σ_{k≥2} L_{k−1}
    decoder: torch.Tensor  # L_0

    @property
    def total(self) -> torch.Tensor:
        return self.prior + self.diffusion + self.decoder


def prior_term(sched: Schedule, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_K | x_0) ‖ N(0, I)): [B,C,H,W] -> [B], nats (summed over dims)."""
    k = torch.full((x0.shape[0],), sched.K, dtype=torch.int64)
    mean, var = q_mean_var(sched, x0, k)
    kl = normal_kl(mean, var.expand_as(mean), torch.zeros_like(mean), torch.ones_like(mean))
    return kl.flatten(1).sum(1)


def step_term(
    net: EpsNet, sched: Schedule, x0: torch.Tensor, k: torch.Tensor, noise: torch.Tensor,
    variance: np.ndarray, clip: bool = True, coupling: np.ndarray | None = None,
    scale: np.ndarray | None = None, spatial: list | None = None,
) -> torch.Tensor:
    """L_{k−1} for each image at its own step k ≥ 1 (k = 1: the decoder L_0): [B], nats (summed
    over dims). ``coupling``: a ρ table (``coupling.table``) for p with coupled colour channels;
    ``scale``: a variance scale table (``varscale.table``); ``spatial``: a checkerboard split of
    the decoder (``spatial``, its stated integers)."""
    xt = q_sample(sched, x0, k, noise)
    p = p_step(net, sched, xt, k, variance, clip, scale)
    q_mean, q_var = q_posterior_mean_var(sched, x0, xt, k)
    first = k == 1
    q_var = q_var.clamp(min=1e-30)  # keeps the unused branch finite (β̃_1 = 0); torch.where picks the used one
    var = p.var.expand_as(p.mean)
    rho = None if coupling is None else coupling_rho(coupling, sched, k)
    if coupling is None:
        kl = normal_kl(q_mean, q_var.expand_as(q_mean), p.mean, var)
    else:
        err = var - at(sched.beta_tilde, k, xt)
        kl = coupled_kl(q_mean, q_var, p.mean, var, err, rho)[:, None]
    if spatial is not None:  # the decoder term once, the split's (not the unsplit one's, thrown away)
        nll0 = split_pixel_nll(x0, p.mean, var, at(sched.beta_tilde, k, xt), rho, spatial)
    elif coupling is None:
        nll0 = -discretized_gaussian_log_prob(x0, p.mean, p.var.sqrt())
    else:
        nll0 = coupled_pixel_nll(x0, p.mean, var, err, rho)[:, None]
    out = torch.where(first, nll0.flatten(1).sum(1), kl.flatten(1).sum(1))  # each summed over its own dims
    assert out.shape == (x0.shape[0],)
    return out


def coupled_pixel_nll(x0: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, err: torch.Tensor,
                      rho) -> torch.Tensor:
    """−log p(x_0 | x_1) per pixel, nats [B, H, W], for the coupled decoder: each channel's
    discretized Gaussian given the channels before it (``coupling.conditional``)."""
    std = var.sqrt()
    r = pair_correlations(var, err, rho)
    z = (x0 - mean) / std
    lower, upper = bin_edges(x0)
    total = 0.0
    for c in range(3):
        m, sd = conditional(c, mean, std, r, [z[:, 0], z[:, 1]])
        total = total - log_normal_interval((lower[:, c] - m) / sd, (upper[:, c] - m) / sd)
    return total


def split_pixel_nll(x0: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, beta_tilde: torch.Tensor, rho,
                    stated) -> torch.Tensor:
    """−log p(x_0 | x_1) per value, nats [B, C, H, W], for the checkerboard decoder (``spatial``),
    its channels coupled by ``rho`` (the step's three ρ) or, for None, each on its own."""
    from .spatial import channel_conditional, pixel_nll

    std = var.sqrt()
    r = None if rho is None else pair_correlations(var, var - beta_tilde, rho)
    return pixel_nll(x0, mean, std, channel_conditional(mean, std, r), stated)


def x0_mse_per_step(net: EpsNet, sched: Schedule, x0: torch.Tensor, gen: torch.Generator,
                    progress: Callable[[int], None] | None = None) -> np.ndarray:
    """e(t) = E‖clip(x̂_0(x_t)) − x_0‖² / D for every step t = 1 … T of ``sched`` (entry 0 is 0),
    from one draw of x_t per image: the calibration behind ``VarianceType.CALIBRATED``."""
    from .diffusion import predict_x0, net_timesteps

    x0 = x0.to(torch.float32)
    e = np.zeros(sched.K + 1, dtype=np.float64)
    for step in range(1, sched.K + 1):
        k = torch.full((x0.shape[0],), step, dtype=torch.int64)
        noise = torch.randn(x0.shape, generator=gen)
        xt = q_sample(sched, x0, k, noise)
        pred = predict_x0(sched, xt, k, eps_of(net, xt, net_timesteps(sched, k))).clamp(-1, 1)
        e[step] = float(((pred.double() - x0.double()) ** 2).mean())
        if progress:
            progress(x0.shape[0])
    return e


def decoder_error_slope(net: EpsNet, sched: Schedule, x0: torch.Tensor, gen: torch.Generator,
                        x0_mse: np.ndarray, delta: float = 0.05) -> float:
    """How the decoder's L_0 (bits/dim, σ the calibrated one) grows with the x̂_0 error at t = 1:
    ½ dL_0/dδ at δ = 0 when the error is scaled by 1 + δ, by a central difference. This is
    g·e of ``diffusion.BoundSampling`` for the decoder: 1 / (2 ln 2) when σ is much wider than a
    pixel's bin, less where the bins are as wide as σ or the pixels saturate (MNIST's black)."""
    from .diffusion import net_timesteps, predict_x0

    if sched.K != sched.T:
        raise ValueError("the decoder slope is measured on the full schedule")
    x0 = x0.to(torch.float32)
    k = torch.ones(x0.shape[0], dtype=torch.int64)
    xt = q_sample(sched, x0, k, torch.randn(x0.shape, generator=gen))
    x0d = x0.double()
    with torch.no_grad():
        err = predict_x0(sched, xt, k, eps_of(net, xt, net_timesteps(sched, k))).clamp(-1, 1).double() - x0d
    std = torch.tensor(math.sqrt(model_variance(sched, VarianceType.CALIBRATED, x0_mse)[1]), dtype=torch.float64)

    def l0(d: float) -> float:
        return float(-discretized_gaussian_log_prob(x0d, x0d + (1 + d) * err, std).mean()) / math.log(2)

    return 0.5 * (l0(delta) - l0(-delta)) / (2 * delta)


def _bound(
    net: EpsNet, sched: Schedule, x0: torch.Tensor, gen: torch.Generator, variance: np.ndarray | None,
    clip: bool, progress: Callable[[int], None] | None,
    draws: Callable[[int], Iterator[tuple[torch.Tensor, float]]], coupling: np.ndarray | None = None,
    scale: np.ndarray | None = None, spatial: list | None = None,
) -> BoundTerms:
    """L_T plus Σ weight·L_{k−1} over the (steps [B], weight) pairs ``draws(B)`` yields; bits/dim [B]."""
    x0 = x0.to(torch.float64)
    variance = model_variance(sched, VarianceType.FIXED_SMALL) if variance is None else variance
    B = x0.shape[0]
    diffusion = torch.zeros(B, dtype=torch.float64)
    decoder = torch.zeros(B, dtype=torch.float64)
    for k, weight in draws(B):  # lazily: each k is drawn just before its noise
        noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        term = step_term(net, sched, x0, k, noise, variance, clip, coupling, scale, spatial) * weight
        decoder += torch.where(k == 1, term, 0.0)
        diffusion += torch.where(k == 1, 0.0, term)
        if progress:
            progress(B)
    to_bpd = 1.0 / (x0[0].numel() * LN2)
    return BoundTerms(prior_term(sched, x0) * to_bpd, diffusion * to_bpd, decoder * to_bpd)


def bound_full(
    net: EpsNet, sched: Schedule, x0: torch.Tensor, gen: torch.Generator,
    variance: np.ndarray | None = None, clip: bool = True,
    progress: Callable[[int], None] | None = None, coupling: np.ndarray | None = None,
    scale: np.ndarray | None = None, spatial: list | None = None,
) -> BoundTerms:
    """The bound of the K-step chain, every term evaluated (K network calls per image); bits/dim [B].
    ``coupling``: a ρ table, for p with coupled colour channels (``coupling``); ``scale``: a
    file's variance scale (``varscale``); ``spatial``: a checkerboard decoder (``spatial``)."""
    return _bound(net, sched, x0, gen, variance, clip, progress,
                  lambda B: ((torch.full((B,), step, dtype=torch.int64), 1.0) for step in range(sched.K, 0, -1)),
                  coupling, scale, spatial)


def bound_mc(
    net: EpsNet, sched: Schedule, x0: torch.Tensor, gen: torch.Generator, samples: int = 1,
    variance: np.ndarray | None = None, clip: bool = True,
    progress: Callable[[int], None] | None = None, coupling: np.ndarray | None = None,
    scale: np.ndarray | None = None, spatial: list | None = None,
) -> BoundTerms:
    """An unbiased estimate of the bound: L_T + K·L_{k−1} with k ~ U{1..K}, averaged over
    ``samples`` draws per image (``samples`` network calls per image); bits/dim [B]."""
    return _bound(net, sched, x0, gen, variance, clip, progress,
                  lambda B: ((torch.randint(1, sched.K + 1, (B,), generator=gen), sched.K / samples)
                             for _ in range(samples)), coupling, scale, spatial)
