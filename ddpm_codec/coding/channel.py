"""Reverse-channel coding for the lossy path: send a sample of q = N(μ_q, s_q² I) with about
KL(q‖p) bits when the receiver knows only p = N(μ_p, s_p² I) (DESIGN.md, "The lossy path").

Minimal random coding (Havasi, Peharz & Hernández-Lobato 2019), one step at a time:

* The step's dimensions (all images of the file together) are put in a pseudo-random order
  both sides derive from the file's seed and the step, and cut into ``n`` equal chunks. The
  random order spreads the KL evenly over the chunks; the encoder picks ``n`` so that each
  chunk carries about ``kl_per_chunk`` bits and records ``n`` in the header.
* For chunk j both sides can draw the same N = 2^``index_bits`` candidates ε_1 … ε_N ~ N(0, I)
  from a stream keyed by (seed, step, j); candidate i stands for x = μ_p + s_p ε_i, a draw
  from p. The encoder picks i with probability ∝ q(x_i)/p(x_i) (Gumbel-max with its own
  seeded noise, so files are reproducible) and sends i in ``index_bits`` bits.
* The receiver draws candidates 1 … i of the same stream (a prefix: numpy's generators
  fill row by row) and sets x = μ_p + s_p ε_i — bit-identical to the encoder's x.

Because the candidates are i.i.d., every index is equally likely whatever q is: the uniform
code of ``index_bits`` bits is the entropy-optimal model for the index, so indices are bit-packed
(an entropy coder would only add its word padding per segment). The chosen x is only
approximately a draw from q when the chunk's KL is close to ``index_bits``; the gap
between ``kl_per_chunk`` and ``index_bits`` trades rate for that approximation (measured in
``eval/rd`` and the tests).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LN2 = math.log(2.0)
DEFAULT_INDEX_BITS = 8
DEFAULT_KL_PER_CHUNK = 8.0  # bits; measured against 6 and 7 (see the model card / note)
ROW_BLOCK = 64  # candidate rows drawn at a time (bounds memory for large steps)


def kl_bits(mu_q: np.ndarray, s_q: float, mu_p: np.ndarray, s_p: float) -> np.ndarray:
    """KL(N(μ_q, s_q²) ‖ N(μ_p, s_p²)) per dimension, in bits."""
    r = (s_q / s_p) ** 2
    return 0.5 * (r - 1.0 - math.log(r) + (mu_q - mu_p) ** 2 / s_p**2) / LN2


def _stream(seed: int, step: int, chunk: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, step, chunk, 0xCA4D])))


def _order(seed: int, step: int, n_dims: int) -> np.ndarray:
    g = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, step, 0x0DE5])))
    return g.permutation(n_dims)


def chunk_count(kl_total_bits: float, kl_per_chunk: float) -> int:
    """Chunks for a step carrying ``kl_total_bits``; 0 (send nothing, draw from p) below half a chunk."""
    if kl_total_bits < 0.5 * kl_per_chunk:
        return 0
    return max(1, int(round(kl_total_bits / kl_per_chunk)))


@dataclass(frozen=True)
class StepChannel:
    """The channel for one step of one file: both sides build it from the header."""

    seed: int
    step: int  # the segment number (distinct per step of the file)
    index_bits: int = DEFAULT_INDEX_BITS

    @property
    def candidates(self) -> int:
        return 1 << self.index_bits

    def _chunks(self, n_dims: int, n_chunks: int) -> list[np.ndarray]:
        return np.array_split(_order(self.seed, self.step, n_dims), n_chunks)

    def prior_draw(self, mu_p: np.ndarray, s_p: float) -> np.ndarray:
        """x for a step sent with no chunks: a draw from p both sides make alike."""
        eps = _stream(self.seed, self.step, -1 & 0xFFFFFFFF).standard_normal(mu_p.size, dtype=np.float32)
        return mu_p + s_p * eps.astype(np.float64)

    def encode(self, mu_q: np.ndarray, s_q: float, mu_p: np.ndarray, s_p: float,
               n_chunks: int) -> tuple[np.ndarray, np.ndarray]:
        """Choose one candidate per chunk; returns (indices [n_chunks] int64, x [D] float64)."""
        if n_chunks == 0:
            return np.zeros(0, dtype=np.int64), self.prior_draw(mu_p, s_p)
        # log q(x)/p(x) at x = μ_p + s_p ε, up to a constant: a·|ε|² + ε·(b Δ)
        a = 0.5 * (1.0 - (s_p / s_q) ** 2)
        b = s_p / s_q**2
        delta = (mu_q - mu_p).astype(np.float64)
        gumbel = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, self.step, 0x6B3E])))
        x = np.empty_like(mu_p, dtype=np.float64)
        idx = np.empty(n_chunks, dtype=np.int64)
        N = self.candidates
        for j, dims in enumerate(self._chunks(mu_p.size, n_chunks)):
            g = _stream(self.seed, self.step, j)
            w = (b * delta[dims]).astype(np.float32)
            noise = gumbel.gumbel(size=N)
            best, best_score, best_row = -1, -np.inf, None
            for r0 in range(0, N, ROW_BLOCK):
                E = g.standard_normal((min(ROW_BLOCK, N - r0), dims.size), dtype=np.float32)
                score = a * np.einsum("ij,ij->i", E, E, dtype=np.float64) + E @ w + noise[r0:r0 + E.shape[0]]
                r = int(np.argmax(score))
                if score[r] > best_score:
                    best, best_score, best_row = r0 + r, float(score[r]), E[r].copy()
            idx[j] = best
            x[dims] = mu_p[dims] + s_p * best_row.astype(np.float64)
        return idx, x

    def decode(self, idx: np.ndarray, mu_p: np.ndarray, s_p: float) -> np.ndarray:
        """x from the chunk indices (``len(idx)`` chunks; none: the shared draw from p)."""
        if idx.size == 0:
            return self.prior_draw(mu_p, s_p)
        x = np.empty_like(mu_p, dtype=np.float64)
        for j, dims in enumerate(self._chunks(mu_p.size, idx.size)):
            i = int(idx[j])
            if not 0 <= i < self.candidates:
                raise ValueError(f"chunk index {i} out of range")
            row = _stream(self.seed, self.step, j).standard_normal((i + 1, dims.size), dtype=np.float32)[i]
            x[dims] = mu_p[dims] + s_p * row.astype(np.float64)
        return x


def pack_indices(idx: np.ndarray, bits: int) -> bytes:
    """Indices < 2^bits, most significant bit first, zero-padded to a whole byte."""
    if idx.size == 0:
        return b""
    b = ((idx[:, None].astype(np.int64) >> np.arange(bits - 1, -1, -1)) & 1).astype(np.uint8)
    return np.packbits(b.reshape(-1)).tobytes()


def unpack_indices(data: bytes, n: int, bits: int) -> np.ndarray:
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    b = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: n * bits].reshape(n, bits).astype(np.int64)
    return b @ (1 << np.arange(bits - 1, -1, -1))


def packed_bytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8
