"""The forward process q, the model's reverse process p_θ, training and sampling.

Equation numbers refer to Ho, Jain & Abbeel 2020 ("DDPM"). Steps k are 1-based
and index the schedule tables directly (see ``schedule``). A network is called as
``net(x_k, timesteps[k])`` and predicts ε (eq. 11).
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .schedule import Schedule

EpsNet = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class VarianceType(enum.Enum):
    """σ_k² of p_θ(x_{k−1} | x_k) (§3.2)."""

    FIXED_LARGE = "beta"  # σ_k² = β_k
    FIXED_SMALL = "beta_tilde"  # σ_k² = β̃_k, except σ_1² = β̃_2 since β̃_1 = 0 (as the reference code)
    # σ_k² = β̃_k + c_k² e(τ_k): c_k the coefficient of x̂_0 in the posterior mean (eq. 7), e(t) the
    # measured per-dimension MSE of the clipped x̂_0 at step t — the isotropic optimum of
    # Analytic-DPM (Bao et al. 2022) for a mean-predicting model. Needs the model's calibration.
    CALIBRATED = "calibrated"
    # per dimension: σ² = β̃_k + c_k² e(τ_k) · exp(s), s the network's second output (a model with
    # ``learn_sigma``), trained on the bound; e the calibration the head was trained against
    # (``LearnedVariance``). s = 0 is CALIBRATED.
    LEARNED = "learned"


S_STEPS = 16  # s is rounded to 1/16: exp(s) comes from a table, identical on every machine
S_MIN, S_MAX = -12.0, 6.0
_EXP_S = np.array([math.exp(i / S_STEPS) for i in range(int(S_MIN * S_STEPS), int(S_MAX * S_STEPS) + 1)])


@dataclass(frozen=True)
class LearnedVariance:
    """The σ² of ``VarianceType.LEARNED``: the calibrated table ``base`` [K+1] and, per step, β̃_k;
    each dimension's σ² = β̃_k + (base_k − β̃_k) · exp(s)."""

    base: np.ndarray
    beta_tilde: np.ndarray

    def per_dim(self, k: torch.Tensor, like: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """σ² of each dimension at steps ``k`` given exp(s) (``scale``, shaped as ``like``)."""
        bt = at(self.beta_tilde, k, like)
        return bt + (at(self.base, k, like) - bt) * scale


def exp_s(s: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
    """exp(s) of the variance head, s clamped to [S_MIN, S_MAX]: float64. Rounded to 1/S_STEPS
    and read from a table unless ``differentiable`` (training), so that coder and decoder agree
    to the bit whatever their exp."""
    if differentiable:
        return torch.exp(s.clamp(S_MIN, S_MAX).to(torch.float64))
    i = torch.round(s.detach().to(torch.float64).clamp(S_MIN, S_MAX) * S_STEPS).to(torch.int64) - int(S_MIN * S_STEPS)
    return torch.from_numpy(_EXP_S)[i]


def split_output(out: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ε, s) from a network's output: s is None unless the network learns σ (2C channels)."""
    if out.shape[1] == channels:
        return out, None
    if out.shape[1] == 2 * channels:
        return out[:, :channels], out[:, channels:]
    raise ValueError(f"the network gave {out.shape[1]} channels for {channels}-channel images")


def eps_of(net: "EpsNet", x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ε_θ(x, t) alone, whether or not the network also learns σ."""
    return split_output(net(x, t), x.shape[1])[0]


# Flip ensembles: the flips (tensor dims of [B, C, H, W]) the network also runs on, beside x itself.
FLIPS: dict[str, tuple[tuple[int, ...], ...]] = {"none": (), "h": ((3,),), "hv": ((3,), (2,), (2, 3))}


class FlipEnsemble(torch.nn.Module):
    """The network's outputs (ε and s alike) averaged over its input and flipped copies of it,
    each output flipped back: a test-time ensemble that lowers the x̂_0 error at every step, so
    every term of the bound, at 2× ("h": left–right) or 4× ("hv": and upside down) the network's
    time. The average is equivariant to the flips (bit for bit for h: its two terms swap, and IEEE
    addition commutes). It pays where the network was trained on mirrored images: on the four
    held-out 256×256 photo crops in 64×64 units (``photos``, K = 100, same noise) the bound went
    3.8654 → 3.8430 (h) → 3.8235 (hv), every photo lower; on 200 MNIST test digits, never
    mirrored in training, 1.0224 → 1.0289 with h (worse); Fashion-MNIST 2.8045 → 2.8035."""

    def __init__(self, net, flips: str):
        super().__init__()
        if flips not in FLIPS:
            raise ValueError(f"unknown flips {flips!r}; choose one of {', '.join(FLIPS)}")
        self.net, self.flips = net, flips

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.net(x, t)
        for dims in FLIPS[self.flips]:
            out = out + torch.flip(self.net(torch.flip(x, dims), t), dims)
        return out / (1 + len(FLIPS[self.flips])) if FLIPS[self.flips] else out


def ensemble(net, flips: str | None):
    """``net`` itself for no flips, else its ``FlipEnsemble``."""
    if flips in (None, "none"):
        return net
    return FlipEnsemble(net, flips)


def at(table: np.ndarray, k: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``table[k]`` as a tensor broadcastable against ``like`` ([B] -> [B, 1, 1, 1])."""
    vals = torch.from_numpy(np.asarray(table, dtype=np.float64)[k.cpu().numpy()]).to(like.dtype)
    return vals.reshape(-1, *([1] * (like.dim() - 1)))


def model_variance(sched: Schedule, var_type: VarianceType, x0_mse: np.ndarray | None = None):
    """σ_k² for k = 0 … K (entry 0 unused), float64.

    The reference code decodes L_0 with σ_1² = β̃_2 for both types; for σ² = β we keep β_1,
    the spread of x_0 given x_1 under a flat prior, which gave a tighter bound on Gaussian
    data with the exact ε-predictor (tests/test_likelihood.py)."""
    if var_type is VarianceType.FIXED_LARGE:
        var = sched.betas.copy()
    elif var_type is VarianceType.FIXED_SMALL:
        var = sched.beta_tilde.copy()
        var[1] = sched.beta_tilde[2] if sched.K >= 2 else sched.betas[1]
    elif var_type in (VarianceType.CALIBRATED, VarianceType.LEARNED):
        if x0_mse is None:
            raise ValueError("the calibrated variance needs the model's x̂_0 error table (ddpm-codec calibrate)")
        e = np.asarray(x0_mse, dtype=np.float64)[sched.timesteps]
        var = sched.beta_tilde + sched.post_coef_x0 ** 2 * e
    else:  # pragma: no cover
        raise ValueError(var_type)
    var[0] = 0.0
    if var_type is VarianceType.LEARNED:
        var.setflags(write=False)
        return LearnedVariance(var, sched.beta_tilde)
    return var


# --- the forward process -----------------------------------------------------------------

def q_mean_var(sched: Schedule, x0: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q(x_k | x_0) = N(√ᾱ_k x_0, (1 − ᾱ_k) I)  (eq. 4): mean [B,C,H,W], variance [B,1,1,1]."""
    return at(np.sqrt(sched.alpha_bar), k, x0) * x0, at(1.0 - sched.alpha_bar, k, x0)


def q_sample(sched: Schedule, x0: torch.Tensor, k: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """A draw of x_k ~ q(x_k | x_0) given the standard normal ``noise`` (eq. 4)."""
    mean, var = q_mean_var(sched, x0, k)
    return mean + var.sqrt() * noise


def q_step_mean_var(sched: Schedule, x_prev: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q(x_k | x_{k−1}) = N(√(1 − β_k) x_{k−1}, β_k I)  (eq. 2)."""
    return at(np.sqrt(1.0 - sched.betas), k, x_prev) * x_prev, at(sched.betas, k, x_prev)


def q_posterior_mean_var(
    sched: Schedule, x0: torch.Tensor, xt: torch.Tensor, k: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q(x_{k−1} | x_k, x_0) = N(μ̃_k, β̃_k I)  (eqs. 6–7), for k ≥ 1."""
    mean = at(sched.post_coef_x0, k, xt) * x0 + at(sched.post_coef_xt, k, xt) * xt
    return mean, at(sched.beta_tilde, k, xt)


def predict_x0(sched: Schedule, xt: torch.Tensor, k: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x̂_0 = (x_k − √(1 − ᾱ_k) ε) / √ᾱ_k (inverse of eq. 4)."""
    return (xt - at(np.sqrt(1.0 - sched.alpha_bar), k, xt) * eps) / at(np.sqrt(sched.alpha_bar), k, xt)


def eps_from_x0(sched: Schedule, xt: torch.Tensor, k: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    return (xt - at(np.sqrt(sched.alpha_bar), k, xt) * x0) / at(np.sqrt(1.0 - sched.alpha_bar), k, xt)


# --- the reverse process -----------------------------------------------------------------

@dataclass
class PStep:
    """p_θ(x_{k−1} | x_k) = N(mean, var I) and the predictions it came from."""

    mean: torch.Tensor  # [B,C,H,W]
    var: torch.Tensor  # [B,1,1,1], or [B,C,H,W] with a learned variance
    eps: torch.Tensor  # [B,C,H,W]
    pred_x0: torch.Tensor  # [B,C,H,W], clipped to [-1, 1] if asked


def net_timesteps(sched: Schedule, k: torch.Tensor) -> torch.Tensor:
    """The original step τ_k fed to the network, as float32 [B]."""
    return torch.from_numpy(sched.timesteps[k.cpu().numpy()]).to(torch.float32)


def p_step(
    net: EpsNet,
    sched: Schedule,
    xt: torch.Tensor,
    k: torch.Tensor,
    variance,
    clip: bool = True,
    scale: np.ndarray | None = None,
) -> PStep:
    """p_θ(x_{k−1} | x_k): mean μ̃_k(x_k, x̂_0(x_k, ε_θ)) (eq. 11 via eq. 7), variance σ_k².

    ``variance`` is the σ² table of ``model_variance`` (a ``LearnedVariance``: σ² per dimension
    from the network's s). The network runs in float32; the rest in the dtype of ``xt``
    (float64 for the bound and the coder). ``scale``: a file's variance fit (a ``varscale.table``):
    the error part E of σ² becomes v_c(τ_k) E + c_k² a_c(τ_k) per channel."""
    eps, s = split_output(net(xt.to(torch.float32), net_timesteps(sched, k)), xt.shape[1])
    eps = eps.to(xt.dtype)
    pred_x0 = predict_x0(sched, xt, k, eps)
    if clip:
        pred_x0 = pred_x0.clamp(-1.0, 1.0)
    mean, _ = q_posterior_mean_var(sched, pred_x0, xt, k)
    if isinstance(variance, LearnedVariance):
        if s is None:
            raise ValueError("a learned variance needs a network that learns σ")
        var = variance.per_dim(k, xt, exp_s(s)).to(xt.dtype)
    else:
        var = at(variance, k, xt)
    if scale is not None:
        from .varscale import apply, at as scale_at
        var = apply(var, at(sched.beta_tilde, k, xt), at(sched.post_coef_x0, k, xt),
                    scale_at(scale, sched, k).to(xt.dtype))
    return PStep(mean=mean, var=var, eps=eps, pred_x0=pred_x0)


# --- Algorithm 1 ----------------------------------------------------------------------------

def l_simple(net: EpsNet, sched: Schedule, x0: torch.Tensor, gen: torch.Generator,
             t_sampling: "BoundSampling | None" = None, variance_loss: "VarianceLoss | None" = None) -> torch.Tensor:
    """L_simple (eq. 14, Algorithm 1): ‖ε − ε_θ(√ᾱ_t x_0 + √(1 − ᾱ_t) ε, t)‖², mean over all dims,
    t uniform; or, with ``t_sampling``, t drawn and each image's error weighted by it
    (``BoundSampling``). With ``variance_loss`` (a network that learns σ) plus its term: the
    hybrid loss of improved DDPM (Nichol & Dhariwal 2021, §3.1)."""
    B = x0.shape[0]
    if t_sampling is None:
        k = torch.randint(1, sched.K + 1, (B,), generator=gen)
    else:
        k = torch.multinomial(t_sampling.probs_t, B, replacement=True, generator=gen)
    noise = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
    xt = q_sample(sched, x0, k, noise)
    eps, s = split_output(net(xt, net_timesteps(sched, k)), x0.shape[1])
    err = (eps - noise) ** 2
    if t_sampling is None:
        loss = torch.mean(err)
    else:
        loss = torch.mean(err.flatten(1).mean(1) * t_sampling.weight_t[k])
    if variance_loss is not None:
        if s is None or t_sampling is None:
            raise ValueError("the variance term needs a network that learns σ and bound sampling")
        loss = loss + variance_loss(x0, xt, k, eps, s, t_sampling.probs_t).to(loss.dtype)
    return loss


@dataclass(frozen=True)
class VarianceLoss:
    """The variance head's term of the hybrid loss: λ · L_k / P(τ_k) for the drawn chain step,
    L_k the bits/dim of the chain's term at τ_k (KL of the jump τ_k → τ_{k−1}, or the decoder's
    L_0) with the mean held fixed (stop-gradient, as improved DDPM's L_vlb): an unbiased estimate
    of λ × the chain's bound, whose gradient reaches only σ. 1 / P is capped at ``max_weight``."""

    chain: Schedule  # the K-step chain bound sampling trains for
    variance: LearnedVariance  # its σ² base (the calibration at the start of training)
    index: np.ndarray  # chain index k of each original step t, 0 off the chain
    weight: float = 1e-3  # λ
    max_weight: float = 1000.0

    @staticmethod
    def build(sched: Schedule, x0_mse: np.ndarray, steps: tuple[int, ...], weight: float = 1e-3) -> "VarianceLoss":
        chain = sched.respace(list(steps))
        index = np.zeros(sched.T + 1, dtype=np.int64)
        index[np.asarray(steps)] = np.arange(1, len(steps) + 1)
        return VarianceLoss(chain, model_variance(chain, VarianceType.LEARNED, x0_mse), index, weight)

    def __call__(self, x0, xt, t, eps, s, probs_t) -> torch.Tensor:
        from .likelihood import LN2, log_normal_interval, bin_edges, normal_kl

        k = torch.from_numpy(self.index[t.numpy()])
        if torch.any(k == 0):
            raise ValueError("a step off the chain reached the variance term")
        x0, xt, eps = x0.double(), xt.double(), eps.detach().double()  # the mean is held fixed
        pred = predict_x0(self.chain, xt, k, eps).clamp(-1.0, 1.0)
        mean, _ = q_posterior_mean_var(self.chain, pred, xt, k)
        var = self.variance.per_dim(k, xt, exp_s(s, differentiable=True))
        q_mean, q_var = q_posterior_mean_var(self.chain, x0, xt, k)
        kl = normal_kl(q_mean, q_var.clamp(min=1e-30).expand_as(q_mean), mean, var)
        lower, upper = bin_edges(x0)  # finite end edges: an infinite one would give 0·∞ gradients
        std = var.sqrt()
        nll0 = -log_normal_interval((lower.clamp(min=-10.0) - mean) / std, (upper.clamp(max=10.0) - mean) / std)
        first = (k == 1).reshape(-1, 1, 1, 1)
        bits = torch.where(first, nll0, kl).flatten(1).mean(1) / LN2
        w = torch.clamp(1.0 / probs_t[t], max=self.max_weight)
        return self.weight * torch.mean(bits * w)


@dataclass(frozen=True)
class BoundSampling:
    """Importance sampling of t for the bound of the K-step chain the codec runs.

    With the calibrated variance the chain's expected bound is Σ_k ½ log2(1 + a_k e(τ_k)) over
    its jumps τ_k → τ_{k−1} (``schedule.jump_costs``; a_k = c_k² / β̃_k) plus the decoder's
    L_0, where e(t) is the x̂_0 error per dimension. With the variances held at the calibration,
    the bound's gradient is Σ_k g_k ∇e(τ_k) with g_k e_k = a_k e_k / (2 ln 2 (1 + a_k e_k)) for a
    jump and, for the decoder, its measured slope (``likelihood.decoder_error_slope``: at most
    1 / (2 ln 2), less where σ is as narrow as a pixel's bin or pixels saturate). Drawing τ_k with
    probability ∝ g_k e_k and weighting the image's ε error by 1 / e_ε(τ_k) (the calibrated
    ε error there, relative error; the same as in x̂_0 since they differ by a factor fixed
    by t) is an unbiased estimate of that gradient. Only the chain's steps are trained on.
    ``scale`` (the mean ε error under uniform t) keeps the loss near L_simple's size; weights are
    capped at 1000 × scale-relative (the last jumps, where ᾱ ≈ 0 makes e_ε tiny and carries
    almost no bits)."""

    steps: tuple[int, ...]  # the chain τ_1 = 1 < … < τ_K = T it was built for
    probs_t: torch.Tensor  # [T+1] float64, probability of each t (0 off the chain)
    weight_t: torch.Tensor  # [T+1] float32, loss weight of each t

    @staticmethod
    def build(sched: Schedule, x0_mse: np.ndarray, K: int, decoder_ge: float) -> "BoundSampling":
        from .schedule import jump_costs, optimal_steps

        if sched.K != sched.T:
            raise ValueError("bound sampling is built on the full schedule")
        e = np.asarray(x0_mse, dtype=np.float64)
        steps = optimal_steps(sched, e, K)
        t = np.asarray(steps[1:])
        s = np.asarray(steps[:-1])
        cost_bits = jump_costs(sched, e, t, s)  # ½ log2(1 + a e)
        ae = np.exp2(2 * cost_bits) - 1.0
        ge = np.zeros(sched.T + 1)
        ge[t] = ae / (2 * np.log(2) * (1 + ae))
        ge[1] = decoder_ge  # the decoder at t = 1
        probs = ge / ge.sum()
        ab = sched.alpha_bar
        eps_mse = np.zeros(sched.T + 1)
        eps_mse[1:] = e[1:] * ab[1:] / (1 - ab[1:])
        if np.any(eps_mse[probs > 0] <= 0):
            raise ValueError("the calibration has a zero x̂_0 error on the chain")
        scale = float(eps_mse[1:].mean())
        weight = np.where(probs > 0, scale / np.maximum(eps_mse, 1e-3 * scale), 0.0)
        return BoundSampling(tuple(steps), torch.from_numpy(probs), torch.from_numpy(weight).float())


# --- Algorithm 2 and DDIM ------------------------------------------------------------------

def _start(sched: Schedule, shape, gen, x_start, from_k) -> tuple[torch.Tensor, int]:
    if x_start is None:
        return torch.randn(shape, generator=gen), sched.K
    if from_k is None or not 1 <= from_k <= sched.K:
        raise ValueError(f"starting from x_k needs k in 1..{sched.K}")
    return x_start.to(torch.float32), from_k


@torch.no_grad()
def sample(
    net: EpsNet,
    sched: Schedule,
    shape: tuple[int, ...],
    gen: torch.Generator,
    variance: np.ndarray | None = None,
    progress: Callable[[int], None] | None = None,
    x_start: torch.Tensor | None = None,
    from_k: int | None = None,
) -> torch.Tensor:
    """Ancestral sampling (Algorithm 2) over the K steps of ``sched`` with the σ² table
    ``variance`` (default σ² = β); returns x_0 in [-1, 1]. With ``x_start`` = x_k and
    ``from_k`` = k it runs the chain down from there (the lossy decoder's reconstruction)."""
    if variance is None:
        variance = model_variance(sched, VarianceType.FIXED_LARGE)
    x, top = _start(sched, shape, gen, x_start, from_k)
    for step in range(top, 0, -1):
        k = torch.full((shape[0],), step, dtype=torch.int64)
        p = p_step(net, sched, x, k, variance)
        if step > 1:
            x = p.mean + p.var.sqrt() * torch.randn(shape, generator=gen)
        else:
            x = p.mean  # the paper displays μ_θ(x_1, 1) noiselessly
        if progress:
            progress(1)
    return x.clamp(-1.0, 1.0)


@torch.no_grad()
def ddim_sample(
    net: EpsNet,
    sched: Schedule,
    shape: tuple[int, ...],
    gen: torch.Generator,
    eta: float = 0.0,
    progress: Callable[[int], None] | None = None,
    x_start: torch.Tensor | None = None,
    from_k: int | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) over the K steps of ``sched``; η = 1 is DDPM-like, η = 0
    deterministic. ``x_start``/``from_k`` as for ``sample``."""
    x, top = _start(sched, shape, gen, x_start, from_k)
    for step in range(top, 0, -1):
        k = torch.full((shape[0],), step, dtype=torch.int64)
        eps = eps_of(net, x, net_timesteps(sched, k))
        x0 = predict_x0(sched, x, k, eps).clamp(-1.0, 1.0)
        eps = eps_from_x0(sched, x, k, x0)
        ab = at(sched.alpha_bar, k, x)
        ab_prev = at(sched.alpha_bar_prev, k, x)
        sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        x = ab_prev.sqrt() * x0 + torch.sqrt((1 - ab_prev - sigma**2).clamp(min=0)) * eps
        if eta > 0 and step > 1:
            x = x + sigma * torch.randn(shape, generator=gen)
        if progress:
            progress(1)
    return x.clamp(-1.0, 1.0)
