"""Noise schedules: float64 tables, built once, read-only.

Indexing convention (used everywhere in ddpm_codec): every table has K + 1
entries and is indexed by the *1-based* step k of the math directly; entry 0
stands for the data itself (alpha_bar[0] = 1, beta[0] = 0). So ``alpha_bar[k]``
is ᾱ at step k for k = 1 … K and no index shift happens anywhere.

A respaced schedule (a step subsequence 0 = τ_0 < τ_1 < … < τ_K = T) is itself
a valid diffusion: its betas are recomputed from ᾱ as
β_k = 1 − ᾱ_{τ_k} / ᾱ_{τ_{k−1}} (improved DDPM, Nichol & Dhariwal 2021, §4).
``timesteps[k] = τ_k`` is the original step fed to the network.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import numpy as np


class ScheduleKind(enum.Enum):
    LINEAR = "linear"  # Ho et al. 2020: β from 1e-4 to 0.02 over T = 1000
    COSINE = "cosine"  # Nichol & Dhariwal 2021, eq. 17


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.float64)
    a.setflags(write=False)
    return a


def _linear_betas(T: int) -> np.ndarray:
    # Scaled so that any T gives the same curve as the paper's T = 1000.
    scale = 1000.0 / T
    return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)


def _cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    def f(t: np.ndarray) -> np.ndarray:
        return np.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    t = np.arange(T + 1, dtype=np.float64)
    alpha_bar = f(t) / f(np.zeros(1))
    return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


@dataclass(frozen=True)
class Schedule:
    """A diffusion schedule over K steps; all tables have K + 1 entries (see module doc)."""

    kind: ScheduleKind
    T: int  # length of the original (un-respaced) schedule
    timesteps: np.ndarray  # int64 [K+1], τ_0 = 0 < τ_1 < … < τ_K = T
    betas: np.ndarray  # [K+1], betas[0] = 0
    alpha_bar: np.ndarray = field(init=False)
    alpha_bar_prev: np.ndarray = field(init=False)  # ᾱ_{k−1}; entry 0 is 1
    beta_tilde: np.ndarray = field(init=False)  # posterior variance β̃_k, eq. 7
    post_coef_x0: np.ndarray = field(init=False)  # coefficient of x_0 in μ̃_k, eq. 7
    post_coef_xt: np.ndarray = field(init=False)  # coefficient of x_k in μ̃_k, eq. 7

    def __post_init__(self) -> None:
        betas = np.asarray(self.betas, dtype=np.float64)
        if betas.ndim != 1 or betas.shape[0] < 2 or betas[0] != 0.0:
            raise ValueError("betas must be a 1-D table with betas[0] == 0")
        if not np.all((betas[1:] > 0) & (betas[1:] < 1)):
            raise ValueError("betas must lie in (0, 1)")
        ts = np.asarray(self.timesteps, dtype=np.int64)
        if ts.shape != betas.shape or ts[0] != 0 or np.any(np.diff(ts) <= 0) or ts[-1] != self.T:
            raise ValueError("timesteps must increase from 0 to T and match betas")
        alphas = 1.0 - betas
        alpha_bar = np.cumprod(alphas)
        alpha_bar_prev = np.concatenate([[1.0], alpha_bar[:-1]])
        beta_tilde = np.zeros_like(betas)
        beta_tilde[1:] = betas[1:] * (1.0 - alpha_bar_prev[1:]) / (1.0 - alpha_bar[1:])
        coef_x0 = np.zeros_like(betas)
        coef_xt = np.zeros_like(betas)
        coef_x0[1:] = np.sqrt(alpha_bar_prev[1:]) * betas[1:] / (1.0 - alpha_bar[1:])
        coef_xt[1:] = np.sqrt(alphas[1:]) * (1.0 - alpha_bar_prev[1:]) / (1.0 - alpha_bar[1:])
        for name, value in [
            ("timesteps", ts),
            ("betas", betas),
            ("alpha_bar", alpha_bar),
            ("alpha_bar_prev", alpha_bar_prev),
            ("beta_tilde", beta_tilde),
            ("post_coef_x0", coef_x0),
            ("post_coef_xt", coef_xt),
        ]:
            arr = np.ascontiguousarray(value)
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)

    @property
    def K(self) -> int:
        """Number of steps of this (possibly respaced) chain."""
        return int(self.betas.shape[0] - 1)

    def respace(self, steps: "list[int] | np.ndarray") -> "Schedule":
        """The chain restricted to original steps ``steps`` (1-based, increasing, ending at T)."""
        steps = np.asarray(sorted(set(int(s) for s in steps)), dtype=np.int64)
        if steps.size == 0 or steps[0] < 1 or steps[-1] != self.T:
            raise ValueError(f"a step subsequence must lie in 1..{self.T} and end at T={self.T}")
        if self.K != self.T:
            raise ValueError("respace the full schedule, not an already respaced one")
        ab = self.alpha_bar[steps]
        ab_prev = np.concatenate([[1.0], ab[:-1]])
        betas = np.concatenate([[0.0], 1.0 - ab / ab_prev])
        return Schedule(self.kind, self.T, np.concatenate([[0], steps]), betas)

    def respace_to(self, K: int) -> "Schedule":
        """Respace to K evenly spaced steps (always including step 1 and step T)."""
        return self.respace(even_steps(self.T, K))

    def spec(self) -> dict:
        """A JSON-able description from which ``schedule_from_spec`` rebuilds this schedule:
        ``K`` for evenly spaced steps (``even_steps``), else the explicit ``steps``."""
        steps = self.timesteps[1:].tolist()
        if steps == even_steps(self.T, self.K):
            return {"kind": self.kind.value, "T": self.T, "K": self.K}
        return {"kind": self.kind.value, "T": self.T, "steps": steps}

    @property
    def steps(self) -> list[int]:
        """The original 1-based steps τ_1 … τ_K of this chain."""
        return self.timesteps[1:].tolist()


def even_steps(T: int, K: int) -> list[int]:
    """K evenly spaced 1-based steps in 1..T, including 1 and T."""
    if not 1 <= K <= T:
        raise ValueError(f"the number of steps must be in 1..{T}, got {K}")
    if K == 1:
        return [T]
    return sorted(set(int(round(x)) for x in np.linspace(1, T, K)))


def make_schedule(kind: ScheduleKind, T: int = 1000) -> Schedule:
    if T < 1:
        raise ValueError("T must be at least 1")
    if kind is ScheduleKind.LINEAR:
        betas = _linear_betas(T)
    elif kind is ScheduleKind.COSINE:
        betas = _cosine_betas(T)
    else:  # pragma: no cover - exhaustive over the enum
        raise ValueError(kind)
    return Schedule(kind, T, np.arange(T + 1), np.concatenate([[0.0], betas]))


def schedule_from_spec(spec: dict) -> Schedule:
    full = make_schedule(ScheduleKind(spec["kind"]), int(spec["T"]))
    steps = even_steps(full.T, int(spec["K"])) if "K" in spec else spec.get("steps")
    if steps is None or list(steps) == list(range(1, full.T + 1)):
        return full
    return full.respace(steps)


def step_costs(sched: "Schedule", x0_mse: np.ndarray) -> np.ndarray:
    """Expected bits per dimension of the reverse step from t down to s (s < t), C[t, s], for a
    model with the calibrated variance σ² = β̃_{s|t} + c_{s|t}² e(t) (``diffusion.model_variance``):
    E KL(q(x_s | x_t, x_0) ‖ p_θ(x_s | x_t)) = ½ log2(1 + c² e(t) / β̃) per dimension, where
    c is the posterior coefficient of x_0 and β̃ the posterior variance of the jump t → s.
    Entries with s ≥ t are +inf. Needs the full schedule (K = T)."""
    if sched.K != sched.T:
        raise ValueError("step costs are for the full schedule")
    T = sched.T
    t = np.arange(T + 1)[:, None]
    s = np.arange(T + 1)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = jump_costs(sched, x0_mse, t, s)
    cost[~((s < t) & (s >= 1))] = np.inf
    return cost


def jump_costs(sched: "Schedule", x0_mse: np.ndarray, t, s) -> np.ndarray:
    """``step_costs`` at the jumps t → s only (arrays of equal shape, 1 ≤ s < t ≤ T)."""
    ab = sched.alpha_bar  # [T+1], ab[0] = 1
    e = np.asarray(x0_mse, dtype=np.float64)
    t, s = np.asarray(t), np.asarray(s)
    beta = 1.0 - ab[t] / ab[s]  # β of the jump s → t
    bt = (1.0 - ab[s]) / (1.0 - ab[t]) * beta  # β̃ of t → s
    c = np.sqrt(ab[s]) * beta / (1.0 - ab[t])
    return 0.5 * np.log2(1.0 + c**2 * e[t] / bt)


def optimal_steps(sched: "Schedule", x0_mse: np.ndarray, K: int) -> list[int]:
    """The K-step subsequence 1 = τ_1 < … < τ_K = T of least expected bound (its Σ L_{t−1}; L_T
    and L_0 do not depend on the choice once τ_1 = 1 and τ_K = T), by dynamic programming over
    ``step_costs`` (Watson et al. 2021, "Learning to efficiently sample from diffusion models")."""
    T = sched.T
    if not 2 <= K <= T:
        return even_steps(T, K)
    C = step_costs(sched, x0_mse)  # C[t, s]
    best = np.full(T + 1, np.inf)  # best[t]: least cost of a path from T down to t with k steps
    best[T] = 0.0
    back = np.zeros((K, T + 1), dtype=np.int64)
    for k in range(1, K):
        tot = best[:, None] + C  # [t, s]: come from t, land on s
        arg = np.argmin(tot, axis=0)
        best = tot[arg, np.arange(T + 1)]
        back[k] = arg
    path = [1]
    for k in range(K - 1, 0, -1):
        path.append(int(back[k][path[-1]]))
    steps = sorted(path)
    if steps[0] != 1 or steps[-1] != T or len(set(steps)) != K:  # pragma: no cover - DP invariant
        raise AssertionError("step optimisation produced an invalid path")
    return steps
