"""Push/pop pairs on constriction's ANS stack (the only importer of constriction).

ANS is last-in-first-out: whatever is pushed last is popped first. Every
``push_*`` here has a ``pop_*`` with the same parameters that returns exactly
the pushed symbols; within one call, symbols are pushed in reverse order so that
the pop returns them in forward order.

Parameters are validated before they reach the coder: constriction panics (a
BaseException) on std ≤ 0 and codes a NaN mean silently.
"""
from __future__ import annotations

import numpy as np

import constriction

_model = constriction.stream.model
ESCAPE_BITS = 20  # excess beyond the edge of a residual range, coded uniformly
MAX_RANGE = 1 << 15  # widest residual range: wider ones spend real mass on the probability floor


class CodingError(ValueError):
    """Parameters the coder cannot take, or a stream that does not decode."""


def _finite(name: str, a: np.ndarray) -> None:
    if not np.all(np.isfinite(a)):
        raise CodingError(f"non-finite {name} reached the entropy coder")


class Stack:
    """An ANS stack of 32-bit words. ``words`` (uint32) seeds it; the last word is the top."""

    def __init__(self, words: np.ndarray | None = None):
        w = np.zeros(0, np.uint32) if words is None else np.ascontiguousarray(words, dtype=np.uint32)
        self._coder = constriction.stream.stack.AnsCoder(w.copy()) if w.size else constriction.stream.stack.AnsCoder()

    def bits(self) -> int:
        """Bits on the stack now (whole words, including the coder's head)."""
        return int(self._coder.num_bits())

    def words(self) -> np.ndarray:
        return np.asarray(self._coder.get_compressed(), dtype=np.uint32).copy()

    # --- a Gaussian on an integer grid, coded as a residual from its rounded mean ------------

    @staticmethod
    def _check_gaussian(frac: np.ndarray, std, R: int) -> np.ndarray:
        """Validates; returns the std per symbol (``std`` is one number or one per symbol)."""
        _finite("mean", frac)
        std = np.asarray(std, dtype=np.float64)
        if not (np.all(np.isfinite(std)) and np.all(std > 0)):
            raise CodingError("a non-positive or non-finite standard deviation reached the entropy coder")
        if not 1 <= R <= MAX_RANGE:
            raise CodingError(f"residual range ±{R} outside 1..{MAX_RANGE}")
        if std.ndim and std.shape != frac.shape:
            raise CodingError("one standard deviation per symbol, or one for all")
        return np.ascontiguousarray(np.broadcast_to(std, frac.shape))

    def push_gaussian(self, residual: np.ndarray, frac: np.ndarray, std, R: int) -> None:
        """Push integer residuals r under N(frac, std²) (``std`` one number or one per residual)
        quantized to integers on [−R, R]
        (tails folded into the edges); |r| ≥ R also pushes the excess |r| − R uniformly
        (``ESCAPE_BITS``), before the residuals, so it is popped after them."""
        residual = np.asarray(residual, dtype=np.int64)
        frac = np.asarray(frac, dtype=np.float64)
        assert residual.shape == frac.shape and residual.ndim == 1
        std = self._check_gaussian(frac, std, R)
        excess = np.abs(residual) - R
        edge = excess >= 0
        if np.any(edge):
            if excess.max() >= 1 << ESCAPE_BITS:
                raise CodingError("a latent lies too far from its model's mean to be coded")
            self._coder.encode_reverse(excess[edge].astype(np.int32), _model.Uniform(1 << ESCAPE_BITS))
        sym = np.clip(residual, -R, R).astype(np.int32)
        self._coder.encode_reverse(sym, _model.QuantizedGaussian(-R, R), frac, std)

    def pop_gaussian(self, frac: np.ndarray, std, R: int) -> np.ndarray:
        """Inverse of ``push_gaussian``: the residuals, int64."""
        frac = np.asarray(frac, dtype=np.float64)
        std = self._check_gaussian(frac, std, R)
        sym = np.asarray(self._coder.decode(_model.QuantizedGaussian(-R, R), frac, std),
                         dtype=np.int64)
        edge = np.abs(sym) == R
        if np.any(edge):
            excess = np.asarray(self._coder.decode(_model.Uniform(1 << ESCAPE_BITS), int(edge.sum())), dtype=np.int64)
            sym[edge] += np.sign(sym[edge]) * excess
        return sym

    def pop_gaussian_bounded(self, frac: np.ndarray, std: float, R: int) -> np.ndarray:
        """Pop residuals in [−R, R] under the quantized N(frac, std²) with folded tails, no escape
        (for sampling latents from q: the popped value is whatever the model gives)."""
        frac = np.asarray(frac, dtype=np.float64)
        std = self._check_gaussian(frac, std, R)
        return np.asarray(self._coder.decode(_model.QuantizedGaussian(-R, R), frac, std),
                          dtype=np.int64)

    def push_gaussian_bounded(self, residual: np.ndarray, frac: np.ndarray, std: float, R: int) -> None:
        """Inverse of ``pop_gaussian_bounded`` (returns the borrowed bits)."""
        residual = np.asarray(residual, dtype=np.int64)
        frac = np.asarray(frac, dtype=np.float64)
        std = self._check_gaussian(frac, std, R)
        if residual.size and np.abs(residual).max() > R:
            raise CodingError("residual outside its bounded range")
        self._coder.encode_reverse(residual.astype(np.int32), _model.QuantizedGaussian(-R, R), frac,
                                   std)

    # --- 256-level categorical (the L_0 decoder) ------------------------------------------------

    @staticmethod
    def _check_probs(probs: np.ndarray) -> np.ndarray:
        probs = np.ascontiguousarray(probs, dtype=np.float64)
        if probs.ndim != 2:
            raise CodingError("categorical probabilities must be [n, levels]")
        _finite("probability", probs)
        if np.any(probs < 0) or np.any(probs.sum(1) <= 0):
            raise CodingError("categorical probabilities must be non-negative and not all zero")
        return probs

    def push_categorical(self, symbols: np.ndarray, probs: np.ndarray) -> None:
        """Push symbols in 0..L−1, each with its own row of probabilities [n, L]."""
        probs = self._check_probs(probs)
        symbols = np.asarray(symbols, dtype=np.int32)
        assert symbols.shape == probs.shape[:1]
        self._coder.encode_reverse(symbols, _model.Categorical(perfect=False), probs)

    def pop_categorical(self, probs: np.ndarray) -> np.ndarray:
        probs = self._check_probs(probs)
        return np.asarray(self._coder.decode(_model.Categorical(perfect=False), probs), dtype=np.int64)
