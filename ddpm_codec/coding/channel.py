"""Reverse-channel coding for the lossy path: send a sample of q = N(μ_q, s_q² I) with about
KL(q‖p) bits when the receiver knows only p = N(μ_p, s_p² I) (DESIGN.md, "The lossy path").

Minimal random coding (Havasi, Peharz & Hernández-Lobato 2019), one step at a time:

* The step's dimensions (all images of the file together) are put in a pseudo-random order
  both sides derive from the file's seed and the step, and cut into ``n`` equal chunks. The
  random order spreads the KL evenly over the chunks; the encoder picks ``n`` so that each
  chunk carries about ``kl_per_chunk`` bits and records ``n`` in the header.
* For chunk j (d dimensions) both sides can draw the same N = 2^``index_bits`` candidates
  ε_1 … ε_N ~ N(0, I_d) from a stream keyed by (seed, step, j); candidate i stands for
  x = μ_p + s_p ε_i, a draw from p. The encoder picks the candidate of largest importance
  weight q(x_i)/p(x_i) and sends i in ``index_bits`` bits. (MRC proper samples i with
  probability ∝ the weight; ``temperature`` = 1 does that by Gumbel-max. Picking the largest
  weight kept the chain closer to q: 3.56 against 4.49 bits/dim on 100 MNIST digits.)
* Candidate layout ``window`` (the default): the candidates are the N overlapping windows
  ε_i = z[i : i + d] of ONE stream z of N + d − 1 normals. Each is a draw from N(0, I_d), and
  all N log weights a·|ε_i|² + ε_i·w come from one cross-correlation (float32 FFTs, overlap-save:
  ``window_correlation``) and a cumulative sum: O((N + d) log d) per chunk instead of N·d normals. That makes 2^16–2^18 candidates per
  chunk affordable, and the cost that matters falls: MRC pays about 2 bits per chunk beyond its
  KL (``index_bits`` − ``kl_per_chunk``; fewer spare bits and the pick drifts from q, which
  the later steps pay for), so the relative overhead is ≈ 2 / ``kl_per_chunk``. Layout
  ``rows`` (files without a "candidates" key) draws N independent rows; it costs N·d normals,
  which limited it to 2^8 candidates and 6 bits of KL per chunk (+33 % on the channel).
* The receiver draws a prefix of the same stream (numpy's generators fill in order) and sets
  x = μ_p + s_p ε_i — bit-identical to the encoder's x.

Because the pick is argmax over exchangeable candidates, its position is uniform: the uniform
code of ``index_bits`` bits is the entropy-optimal model for the index, so indices are
bit-packed (an entropy coder would only add its final words per segment). Ordered random
coding with an entropy-coded index (Theis & Yosri 2022) was simulated on Gaussian chunks of 6
bits of KL: its index costs less (6.6–8.3 bits for 2^8–2^12 candidates) but its pick carries
less of q, and index bits minus the pick's log weight came to 2.3 bits against greedy MRC's 2.0.

Two other picks measured worse (100 MNIST digits, cosine model, 16/14): the candidate whose log
weight is nearest that of a fresh draw from q — an exact sample of q wherever the candidates
reach, since q and p agree on each level set of the weight — gave 1.968 bits/dim against the
largest weight's 1.721 (a chain that follows q exactly pays the heavy chunks' shortfall in
full, while the largest weight overshoots the light chunks and makes up for it); aiming at
μ_p + γ(μ_q − μ_p), γ = 1.1 or 1.2, changed nothing beyond the ±0.01 of different digits.

Measured on 100 MNIST test digits, shipped model, K = 100 optimal steps, 1 thread (whole file
in bits/dim; KL along the coded chain; the chain's bound with exact draws is 1.651):
rows 8/6: 1.992 (channel coded 1.035 vs KL 0.777); window 16/14: 1.858 (0.901 vs 0.789);
window 17/15: 1.853; window 18/16: 1.841 (0.886 vs 0.785); window 18/16.5: 1.848; window 18/17:
1.855 (the KL drifts to 1.721). Held-out photo (astronaut, 256×256 crop, ``photos`` model):
rows 8/6 4.398; window 16/14 4.113 (channel 74 s on 1 thread); window 18/16 4.080 (213 s).
Default: window, 16 index bits, 14 bits of KL per chunk — within 1 % of 18/16 at a third of
the channel's time; ``--index-bits 18 --kl-per-chunk 16`` buys that last percent.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import scipy.fft

LN2 = math.log(2.0)
DEFAULT_INDEX_BITS = 16
DEFAULT_KL_PER_CHUNK = 14.0  # bits (measurements in the module doc)
DEFAULT_LAYOUT = "window"
LAYOUTS = ("rows", "window")
ROW_BLOCK = 64  # candidate rows drawn at a time (bounds memory for large steps)


def kl_bits(mu_q: np.ndarray, s_q: float, mu_p: np.ndarray, s_p) -> np.ndarray:
    """KL(N(μ_q, s_q²) ‖ N(μ_p, s_p²)) per dimension, in bits (``s_p`` one number or one per dimension)."""
    r = (s_q / s_p) ** 2
    return 0.5 * (r - 1.0 - np.log(r) + (mu_q - mu_p) ** 2 / s_p**2) / LN2


def balanced_chunks(order: np.ndarray, weight: np.ndarray, n_chunks: int) -> list[np.ndarray]:
    """Split the dimensions into ``n_chunks`` of nearly equal total ``weight`` (a per-dimension
    prediction of the KL that both sides compute): sorted by weight, heaviest first (ties in the
    pseudo-random ``order``), dealt to the chunks back and forth (0 … n−1, n−1 … 0, …). Chunk
    sizes differ by at most one, like ``np.array_split``'s."""
    ranked = order[np.argsort(-weight[order], kind="stable")]
    r = np.arange(ranked.size)
    lap, pos = np.divmod(r, n_chunks)
    label = np.where(lap % 2 == 0, pos, n_chunks - 1 - pos)
    by = np.argsort(label, kind="stable")
    bounds = np.cumsum(np.bincount(label, minlength=n_chunks))[:-1]
    return np.split(ranked[by], bounds)


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
    temperature: float = 0.0  # encoder only: Gumbel noise on the log weights (0: largest weight; 1: MRC's sampling)
    workers: int = 1  # threads over chunks (the result is the same for any number)
    layout: str = DEFAULT_LAYOUT  # candidates: "window" (windows of one sequence) or "rows" (independent rows)

    @property
    def candidates(self) -> int:
        return 1 << self.index_bits

    def _chunks(self, n_dims: int, n_chunks: int, weight: np.ndarray | None = None) -> list[np.ndarray]:
        order = _order(self.seed, self.step, n_dims)
        if weight is None:
            return np.array_split(order, n_chunks)
        return balanced_chunks(order, weight, n_chunks)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown candidate layout {self.layout!r}")

    def _gumbel(self, j: int, n: int) -> np.ndarray | float:
        """The encoder's Gumbel noise on chunk j's n log weights (0 at temperature 0: the largest weight)."""
        if self.temperature <= 0:
            return 0.0
        g = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, self.step, j, 0x6B3E])))
        return self.temperature * g.gumbel(size=n)

    def prior_draw(self, mu_p: np.ndarray, s_p) -> np.ndarray:
        """x for a step sent with no chunks: a draw from p both sides make alike."""
        eps = _stream(self.seed, self.step, -1 & 0xFFFFFFFF).standard_normal(mu_p.size, dtype=np.float32)
        return mu_p + s_p * eps.astype(np.float64)

    def _map(self, fn, jobs: list) -> list:
        if self.workers <= 1 or len(jobs) < 2:
            return [fn(*j) for j in jobs]
        with ThreadPoolExecutor(self.workers) as ex:  # numpy's generators and BLAS release the GIL
            return list(ex.map(lambda j: fn(*j), jobs))

    def encode(self, mu_q: np.ndarray, s_q: float, mu_p: np.ndarray, s_p,
               n_chunks: int, weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Choose one candidate per chunk; returns (indices [n_chunks] int64, x [D] float64).
        ``s_p``: p's standard deviation, one number or one per dimension (a learned variance;
        window layout only). ``weight``: chunks balanced by this per-dimension prediction of the
        KL (``balanced_chunks``; the decoder must pass the same), else cut from the random order.
        Each chunk has its own streams, so the result does not depend on ``workers``."""
        per_dim = np.ndim(s_p) > 0
        if per_dim and self.layout != "window":
            raise ValueError("a per-dimension σ of p needs the window layout")
        if n_chunks == 0:
            return np.zeros(0, dtype=np.int64), self.prior_draw(mu_p, s_p)
        # log q(x)/p(x) at x = μ_p + s_p ε, up to a constant: Σ a_i ε_i² + ε·(b Δ)
        a = 0.5 * (1.0 - (np.asarray(s_p, dtype=np.float64) / s_q) ** 2)
        b = s_p / s_q**2
        delta = (mu_q - mu_p).astype(np.float64)
        N = self.candidates

        def one(j: int, dims: np.ndarray) -> tuple[int, np.ndarray]:
            g = _stream(self.seed, self.step, j)
            w = (b * delta[dims]).astype(np.float32)
            noise = np.broadcast_to(self._gumbel(j, N), (N,))
            rows = max(1, min(ROW_BLOCK, (1 << 22) // max(1, dims.size)))
            best, best_score, best_row = -1, -np.inf, None
            for r0 in range(0, N, rows):
                E = g.standard_normal((min(rows, N - r0), dims.size), dtype=np.float32)
                score = a * np.einsum("ij,ij->i", E, E, dtype=np.float64) + E @ w + noise[r0:r0 + E.shape[0]]
                r = int(np.argmax(score))
                if score[r] > best_score:
                    best, best_score, best_row = r0 + r, float(score[r]), E[r].copy()
            return best, best_row

        def one_window(j: int, dims: np.ndarray) -> tuple[int, np.ndarray]:
            d = dims.size
            z = _stream(self.seed, self.step, j).standard_normal(N + d - 1, dtype=np.float32)
            if per_dim:  # Σ a_i ε_i² over each window: a second correlation, of z² with a
                score = window_correlation(z * z, a[dims], N).astype(np.float64)
                score += window_correlation(z, (b[dims] * delta[dims]), N)
            else:
                c = np.empty(N + d)  # c[k] = Σ_{m<k} z_m², summed in float64
                c[0] = 0.0
                np.cumsum(z * z, dtype=np.float64, out=c[1:])
                score = c[d:d + N] - c[:N]
                score *= a
                score += window_correlation(z, b * delta[dims], N)
            if self.temperature > 0:
                score += self._gumbel(j, N)
            i = int(np.argmax(score))
            return i, z[i:i + d]

        chunks = self._chunks(mu_p.size, n_chunks, weight)
        x = np.empty_like(mu_p, dtype=np.float64)
        idx = np.empty(n_chunks, dtype=np.int64)
        fn = one_window if self.layout == "window" else one
        for j, (dims, (i, row)) in enumerate(zip(chunks, self._map(fn, list(enumerate(chunks))))):
            idx[j] = i
            x[dims] = mu_p[dims] + (s_p[dims] if per_dim else s_p) * row.astype(np.float64)
        return idx, x

    def decode(self, idx: np.ndarray, mu_p: np.ndarray, s_p, weight: np.ndarray | None = None) -> np.ndarray:
        """x from the chunk indices (``len(idx)`` chunks; none: the shared draw from p); ``s_p``
        and ``weight`` as the encoder had them."""
        if idx.size == 0:
            return self.prior_draw(mu_p, s_p)
        if idx.min() < 0 or idx.max() >= self.candidates:
            raise ValueError("chunk index out of range")
        per_dim = np.ndim(s_p) > 0
        chunks = self._chunks(mu_p.size, idx.size, weight)

        def one(j: int, dims: np.ndarray) -> np.ndarray:
            i = int(idx[j])
            g = _stream(self.seed, self.step, j)
            if self.layout == "window":
                return g.standard_normal(i + dims.size, dtype=np.float32)[i:]
            return g.standard_normal((i + 1, dims.size), dtype=np.float32)[i]

        x = np.empty_like(mu_p, dtype=np.float64)
        for dims, row in zip(chunks, self._map(one, list(enumerate(chunks)))):
            x[dims] = mu_p[dims] + (s_p[dims] if per_dim else s_p) * row.astype(np.float64)
        return x


def window_correlation(z: np.ndarray, w: np.ndarray, n: int) -> np.ndarray:
    """corr[i] = z[i : i + d] · w for i < n (d = len(w), len(z) ≥ n + d − 1), float32 FFTs by
    overlap-save in blocks of a few times d: about 3× faster than one float64 FFT of the whole
    stream (measured on 2^16 windows of 108 dims: 0.8 against 2.3 ms). Only the encoder computes
    scores, so their rounding (about 1e-5 here) can change a near-tie's pick, never the format."""
    d = w.size
    B = 1 << max(10, math.ceil(math.log2(4 * d)))
    S = B - d + 1  # valid outputs per block
    nb = -(-n // S)
    zz = np.zeros(nb * S + d - 1, dtype=np.float32)  # = (nb − 1)·S + B: every block inside
    m = min(z.size, zz.size)
    zz[:m] = z[:m]
    blocks = np.lib.stride_tricks.as_strided(zz, shape=(nb, B), strides=(S * zz.itemsize, zz.itemsize), writeable=False)
    W = np.conj(scipy.fft.rfft(w.astype(np.float32), B))
    out = scipy.fft.irfft(scipy.fft.rfft(blocks, axis=1) * W, B, axis=1)[:, :S]
    return out.reshape(-1)[:n]


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
