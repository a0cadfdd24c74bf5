"""Lossless bits-back coding over the diffusion chain, in Bit-Swap order (DESIGN.md).

Per batch of images, with the K-step chain of a (respaced) schedule:

    encode:  for k = 1 … K:
                 pop  x_k      from q(x_k | x_{k−1})      (bits back; k = 1 reads x_0 = the pixels)
                 push x_{k−1}  with p_θ(x_{k−1} | x_k)    (k = 1: the 256-level decoder of L_0)
             push x_K with p(x_K) = N(0, I)
    decode:  pop x_K; for k = K … 1: pop x_{k−1} with p_θ, push x_k back with q.

Pushed in this order, popped in the reverse. Latent x_k lives on the grid δ_k·ℤ with
δ_k = √β_k / 2^b; it is coded as an integer residual from the rounded model mean.
Batches are chained on one stack: the decoder takes them last first.

Determinism: the network sees identical float32 inputs and batch shapes on both
sides; everything else that reaches the coder is float64 arithmetic (+ − × ÷ √,
rounding), which is exact and thread-count independent, or scipy's scalar ndtr.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from scipy.special import ndtr

from ..coupling import conditional, pair_correlations
from ..spatial import channel_conditional, neighbour_mean, phase_b, shifted, weights
from ..diffusion import EpsNet, LearnedVariance, p_step
from ..schedule import Schedule
from .entropy import MAX_RANGE, Stack

RANGE_SIGMAS = 12.0  # residual ranges are ±12 standard deviations (in grid units)
PIXEL_CHUNK = 1 << 15  # dims per categorical call (a [chunk, 256] float64 table)


def pixel_probs(mean: np.ndarray, std) -> np.ndarray:
    """p(u | mean, std) for u = 0 … 255: the discretized Gaussian of L_0 (eq. 13) with bin
    edges at x ± 1/255, end bins open; [n] -> [n, 256], float64 (scalar ndtr: deterministic).
    ``std``: one number, or one per value [n] (a learned variance)."""
    levels = np.arange(256, dtype=np.float64) * (2.0 / 255.0) - 1.0
    edges = np.concatenate([[-np.inf], levels[:-1] + 1.0 / 255.0, [np.inf]])
    std = np.asarray(std, dtype=np.float64)
    z = (edges[None, :] - mean[:, None]) / (std[:, None] if std.ndim else std)  # [n, 257]
    lower, upper = ndtr(z), ndtr(-z)  # Φ(z) and 1 − Φ(z), each exact in its own tail
    right = z[:, :-1] > 0  # bins right of the mean: differences of the upper tail keep precision
    p = np.where(right, upper[:, :-1] - upper[:, 1:], lower[:, 1:] - lower[:, :-1])
    assert p.shape == (mean.shape[0], 256)
    return p


@dataclass(frozen=True)
class ChainCoder:
    """Bits-back coder for one model, one K-step chain, one grid."""

    net: EpsNet
    sched: Schedule
    variance: "np.ndarray | LearnedVariance"  # σ_k² of p_θ, [K+1] (``model_variance``)
    grid_bits: int = 2
    coupling: np.ndarray | None = None  # a ρ table: p with coupled colour channels (``coupling``), coded R, G, B
    scale: np.ndarray | None = None  # variance fits [F, T+1, 2C] (``varscale.tables``): p's error variance refitted
    spatial: list | None = None  # a checkerboard split of the decoder (``spatial``: its 2C stated integers)
    delta: np.ndarray = field(init=False)  # grid widths δ_k, [K+1] (entry 0 unused: pixels)

    def __post_init__(self) -> None:
        table = self.variance.base if isinstance(self.variance, LearnedVariance) else self.variance
        if table.shape != (self.sched.K + 1,) or not np.all(table[1:] > 0):
            raise ValueError("the variance table must be positive, one entry per step")
        delta = np.sqrt(self.sched.betas) / 2.0 ** self.grid_bits
        delta[0] = np.nan
        object.__setattr__(self, "delta", delta)

    @property
    def K(self) -> int:
        return self.sched.K

    def _q_std(self) -> float:
        """std of q(x_k | x_{k−1}) in units of δ_k: √β_k / δ_k = 2^b for every k."""
        return float(2.0 ** self.grid_bits)

    def _q_range(self) -> int:
        return int(math.ceil(RANGE_SIGMAS * self._q_std()))

    def _p_std_range(self, k: int, std) -> tuple["float | np.ndarray", int]:
        """std of p_θ(x_{k−1} | x_k) in units of δ_{k−1} (one number, or one per dimension for a
        learned variance or coupled channels), and the residual range of the widest (k ≥ 2)."""
        s = std / self.delta[k - 1]
        return s, int(min(MAX_RANGE, math.ceil(RANGE_SIGMAS * float(np.max(s)))))

    def _prior_std_range(self) -> tuple[float, int]:
        s = 1.0 / self.delta[self.K]
        return s, int(min(MAX_RANGE, math.ceil(RANGE_SIGMAS * s)))

    def _scale(self, fits: np.ndarray | None, B: int) -> np.ndarray | None:
        """The variance fit of each of a batch's B units (``fits``: their indices; None: fit 0)."""
        if self.scale is None:
            return None
        return self.scale[np.zeros(B, dtype=np.int64) if fits is None else np.asarray(fits, dtype=np.int64)]

    def _p(self, n_k: np.ndarray, k: int, shape: tuple[int, ...], scale: np.ndarray | None = None
           ) -> tuple[np.ndarray, "float | np.ndarray"]:
        """Mean of p_θ(x_{k−1} | x_k) given the grid indices of x_k, [B·D] float64, and its
        variance: one number, or [B·D] for a learned variance or a variance scale."""
        xt = torch.from_numpy((n_k * self.delta[k]).reshape(shape))
        kk = torch.full((shape[0],), k, dtype=torch.int64)
        with torch.no_grad():
            step = p_step(self.net, self.sched, xt, kk, self.variance, scale=scale)
        if isinstance(self.variance, LearnedVariance) or scale is not None:
            return step.mean.numpy().reshape(-1), step.var.expand_as(step.mean).numpy().reshape(-1)
        return step.mean.numpy().reshape(-1), float(self.variance[k])

    def _p_frac(self, mean: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """p_θ(x_{k−1} | x_k) as (rounded centre, fractional mean) in units of δ_{k−1} (k ≥ 2)."""
        m = mean / self.delta[k - 1]
        c = np.rint(m)
        return c, m - c

    def _q_frac(self, x_prev: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """q(x_k | x_{k−1}) as (rounded centre, fractional mean) in units of δ_k."""
        mu = math.sqrt(1.0 - self.sched.betas[k]) * x_prev / self.delta[k]
        c = np.rint(mu)
        return c, mu - c

    # --- pixels (k = 1) ----------------------------------------------------------------------

    @staticmethod
    def _part(std, s: int):
        return std[s:s + PIXEL_CHUNK] if np.ndim(std) else std

    def _push_pixels(self, stack: Stack, u: np.ndarray, mean: np.ndarray, std) -> None:
        starts = list(range(0, u.size, PIXEL_CHUNK))
        for s in reversed(starts):  # last chunk first, so the decoder pops chunk 0 first
            stack.push_categorical(u[s:s + PIXEL_CHUNK], pixel_probs(mean[s:s + PIXEL_CHUNK], self._part(std, s)))

    def _pop_pixels(self, stack: Stack, mean: np.ndarray, std) -> np.ndarray:
        parts = [stack.pop_categorical(pixel_probs(mean[s:s + PIXEL_CHUNK], self._part(std, s)))
                 for s in range(0, mean.size, PIXEL_CHUNK)]
        return np.concatenate(parts)

    # --- coupled colour channels (``coupling``): channel by channel, R first -------------------

    def _coupled(self, k: int, mean: np.ndarray, var, shape: tuple[int, ...]):
        """(mean, std, pair correlations) of step k, each [B, 3, H·W] (the correlations [B, H·W])."""
        B = shape[0]
        if shape[1] != 3:
            raise ValueError("colour coupling needs 3-channel images")
        m = mean.reshape(B, 3, -1)
        v = np.broadcast_to(np.asarray(var, dtype=np.float64).reshape(-1) if np.ndim(var) else var, mean.shape).reshape(B, 3, -1)
        rho = self.coupling[self.sched.timesteps[k]]
        return m, np.sqrt(v), pair_correlations(v, v - self.sched.beta_tilde[k], rho)

    def _channel_dims(self, shape: tuple[int, ...], c: int) -> np.ndarray:
        B, C = shape[0], shape[1]
        hw = int(np.prod(shape[2:]))
        return (np.arange(B)[:, None] * C * hw + c * hw + np.arange(hw)[None, :]).reshape(-1)

    def _push_coupled(self, stack: Stack, k: int, values: np.ndarray, mean: np.ndarray, var, shape) -> None:
        """Push step k's x_{k−1} (k = 1: the pixels' levels ``values``; else grid indices) channel by
        channel, B last, so that the decoder pops R first and codes G given R, B given both."""
        m, std, r = self._coupled(k, mean, var, shape)
        B = shape[0]
        x = (values * (2.0 / 255.0) - 1.0) if k == 1 else values * self.delta[k - 1]
        z = (x.reshape(B, 3, -1) - m) / std
        for c in (2, 1, 0):
            mc, sc = conditional(c, m, std, r, [z[:, 0], z[:, 1]])
            self._push_channel(stack, k, values[self._channel_dims(shape, c)], mc.reshape(-1), sc.reshape(-1))

    def _pop_coupled(self, stack: Stack, k: int, mean: np.ndarray, var, shape) -> np.ndarray:
        m, std, r = self._coupled(k, mean, var, shape)
        out = np.empty(mean.size, dtype=np.int64 if k == 1 else np.float64)
        z = []
        for c in range(3):
            mc, sc = conditional(c, m, std, r, z)
            vals = self._pop_channel(stack, k, mc.reshape(-1), sc.reshape(-1))
            out[self._channel_dims(shape, c)] = vals
            x = (vals * (2.0 / 255.0) - 1.0) if k == 1 else vals * self.delta[k - 1]
            z.append((x.reshape(shape[0], -1) - m[:, c]) / std[:, c])
        return out

    # --- the checkerboard decoder (``spatial``): phase A, then phase B given A -------------------

    def _split_parts(self, mean: np.ndarray, var, shape):
        """(conditional(c, z) -> (mean, std) [B, H·W], mean [B, C, H·W], std [B, C, H·W], phase B's
        mask [H·W], w [C], f [C]) of the decoder step: channels coupled if the coder couples them,
        else each on its own."""
        B, C = shape[0], shape[1]
        if self.coupling is not None:
            m, std, r = self._coupled(1, mean, var, shape)
        else:
            m, r = mean.reshape(B, C, -1), None
            std = np.broadcast_to(np.sqrt(np.asarray(var, dtype=np.float64)).reshape(-1) if np.ndim(var)
                                  else math.sqrt(var), mean.shape).reshape(B, C, -1)
        w, f = weights(self.spatial, C)
        return channel_conditional(m, std, r), m, std, phase_b(*shape[2:]).reshape(-1), w, f

    def _push_split(self, stack: Stack, u: np.ndarray, mean: np.ndarray, var, shape) -> None:
        """Push the pixels' levels ``u`` phase B first (channels last first), then phase A, so that
        the decoder pops phase A (R, G, B), then phase B given A."""
        cond, m, std, b, w, f = self._split_parts(mean, var, shape)
        B, C, H, W = shape
        levels = u.reshape(B, C, -1)
        x = levels * (2.0 / 255.0) - 1.0
        z = (x - m) / std
        parts = []
        for c in range(C):
            mc, sc = cond(c, [z[:, j] for j in range(c)])
            n = neighbour_mean(((x[:, c] - mc) / sc).reshape(B, H, W)).reshape(B, -1)
            mb, sb = shifted(mc, sc, n, w[c], f[c])
            parts.append(((mc[:, ~b], sc[:, ~b]), (mb[:, b], sb[:, b])))
        for phase, sel in ((1, b), (0, ~b)):
            for c in reversed(range(C)):
                mc, sc = parts[c][phase]
                self._push_pixels(stack, levels[:, c][:, sel].reshape(-1), mc.reshape(-1), sc.reshape(-1))

    def _pop_split(self, stack: Stack, mean: np.ndarray, var, shape) -> np.ndarray:
        cond, m, std, b, w, f = self._split_parts(mean, var, shape)
        B, C, H, W = shape
        levels = np.zeros((B, C, H * W), dtype=np.int64)
        z = np.zeros((B, C, H * W))
        resid = np.zeros((B, C, H * W))
        for c in range(C):  # phase A
            mc, sc = cond(c, [z[:, j] for j in range(c)])
            vals = self._pop_pixels(stack, mc[:, ~b].reshape(-1), sc[:, ~b].reshape(-1)).reshape(B, -1)
            levels[:, c, ~b] = vals
            x = vals * (2.0 / 255.0) - 1.0
            z[:, c, ~b] = (x - m[:, c, ~b]) / std[:, c, ~b]
            resid[:, c, ~b] = (x - mc[:, ~b]) / sc[:, ~b]
        for c in range(C):  # phase B, given A's residuals
            mc, sc = cond(c, [z[:, j] for j in range(c)])
            n = neighbour_mean(resid[:, c].reshape(B, H, W)).reshape(B, -1)
            mb, sb = shifted(mc, sc, n, w[c], f[c])
            vals = self._pop_pixels(stack, mb[:, b].reshape(-1), sb[:, b].reshape(-1)).reshape(B, -1)
            levels[:, c, b] = vals
            z[:, c, b] = (vals * (2.0 / 255.0) - 1.0 - m[:, c, b]) / std[:, c, b]
        return levels.reshape(-1)

    def _push_channel(self, stack: Stack, k: int, values: np.ndarray, mean: np.ndarray, std) -> None:
        """Push x_{k−1}'s ``values`` (k = 1: pixel levels; else grid indices) with N(mean, std²)."""
        if k == 1:
            self._push_pixels(stack, values, mean, std)
            return
        s, R = self._p_std_range(k, std)
        cp, fp = self._p_frac(mean, k)
        stack.push_gaussian(values - cp, fp, s, R)

    def _pop_channel(self, stack: Stack, k: int, mean: np.ndarray, std) -> np.ndarray:
        if k == 1:
            return self._pop_pixels(stack, mean, std)
        s, R = self._p_std_range(k, std)
        cp, fp = self._p_frac(mean, k)
        return cp + stack.pop_gaussian(fp, s, R)

    # --- one batch ---------------------------------------------------------------------------

    def encode(self, stack: Stack, u8: np.ndarray, on_step: Callable[[Stack], None] | None = None,
               fits: np.ndarray | None = None) -> None:
        """Push a batch of images, uint8 [B, C, H, W]. ``on_step(stack)`` runs after every pop
        (where the stack is lowest), e.g. to track the initial bits. ``fits``: each image's variance
        fit (an index into ``scale``; None: the first)."""
        shape = u8.shape
        scale = self._scale(fits, shape[0])
        u = u8.reshape(-1).astype(np.int64)
        x_prev = u * (2.0 / 255.0) - 1.0  # x_0
        n_prev = None
        for k in range(1, self.K + 1):
            c, frac = self._q_frac(x_prev, k)
            n_k = c + stack.pop_gaussian_bounded(frac, self._q_std(), self._q_range())
            if on_step:
                on_step(stack)
            mean, var = self._p(n_k, k, shape, scale)
            if k == 1 and self.spatial is not None:
                self._push_split(stack, u, mean, var, shape)
            elif self.coupling is not None:
                self._push_coupled(stack, k, u if k == 1 else n_prev, mean, var, shape)
            else:
                self._push_channel(stack, k, u if k == 1 else n_prev, mean, np.sqrt(var))
            x_prev, n_prev = n_k * self.delta[k], n_k
        s, R = self._prior_std_range()
        stack.push_gaussian(n_prev, np.zeros(n_prev.shape), s, R)

    def decode(self, stack: Stack, shape: tuple[int, ...], fits: np.ndarray | None = None) -> np.ndarray:
        """Pop a batch of images of ``shape`` [B, C, H, W] (``fits`` as ``encode``'s); returns uint8."""
        size = int(np.prod(shape))
        scale = self._scale(fits, shape[0])
        s, R = self._prior_std_range()
        n_k = stack.pop_gaussian(np.zeros(size), s, R)
        for k in range(self.K, 0, -1):
            mean, var = self._p(n_k, k, shape, scale)
            if k == 1 and self.spatial is not None:
                vals = self._pop_split(stack, mean, var, shape)
            elif self.coupling is not None:
                vals = self._pop_coupled(stack, k, mean, var, shape)
            elif k == 1:
                vals = self._pop_pixels(stack, mean, np.sqrt(var))
            else:
                vals = self._pop_channel(stack, k, mean, np.sqrt(var))
            if k == 1:
                u = vals
                x_prev = u * (2.0 / 255.0) - 1.0
            else:
                n_prev = vals
                x_prev = n_prev * self.delta[k - 1]
            c, frac = self._q_frac(x_prev, k)
            stack.push_gaussian_bounded(n_k - c, frac, self._q_std(), self._q_range())
            n_k = n_prev if k > 1 else None
        return u.reshape(shape).astype(np.uint8)
