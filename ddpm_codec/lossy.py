"""Progressive lossy coding: Algorithms 3 and 4 of Ho et al. (2020) with real bits.

A file sends the chain from the top down, one segment per step, each a sample of the forward
posterior coded against the model's reverse step by reverse-channel coding
(``coding.channel``):

    segment 0          x_{τ_K} ~ q(x_{τ_K} | x_0)                 against p(x_T) = N(0, I)
    segment s (1…K−1)  x_{τ_{K−s}} ~ q(x_{τ_{K−s}} | x_{τ_{K−s+1}}, x_0)  against p_θ(· | x_{τ_{K−s+1}})
    segment K (tail)   x_0 exactly, with the L_0 decoder p_θ(x_0 | x_{τ_1}) on an ANS stack

The receiver may stop after any segment holding x_t and reconstruct x̂_0 from it (the paper's
progressive estimate, or by running the model down from x_t). A file cut at a segment
boundary is a valid file of lower rate; each segment has an 8-bit check in the header, so a
truncated file decodes up to its last whole segment and anything else corrupt is refused.

With a learned variance (version-4 files) p_θ has one σ per dimension, in the channel and in
the tail's decoder, and each step's chunks are dealt by the KL that σ predicts (½ log(σ²/β̃) per
dimension, known to both sides; ``channel.balanced_chunks``). On 100 MNIST test digits with the
shipped ``mnist`` (1 thread): the complete file 1.4805 → 1.1967 bits/dim against the calibrated
σ (theoretical rate 1.2783 → 1.0089; tail 0.478 → 0.267); the balanced chunks alone 1.2035 →
1.1977, 16 index bits / 14 of KL. The channel's price stays ≈ 1.15 coded bits per bit of KL
(≈ 2 spare bits per chunk, and the pick's drift from q): 20/18 gives 1.1782 at 3.4× the
encoder's channel time; 16/13, 16/15, and a different KL per chunk for the last steps only
(12 or 16) all land within 0.004 of 16/14.

All images (tiles) of a file share each step: the network runs on fixed batches of units (part
of the format, with the thread count: see ``codec.torch_threads``) and the channel codes the
step's dimensions of all units together. Images are cut into units as lossless files cut them
(``codec.UnitLayout``): a side that is not a multiple of the tile gets units of nearly equal
sides, not a padded last tile (version 7; the network runs each shape's units in its own batches).
A file whose network runs as a flip ensemble (``diffusion.FlipEnsemble``, header key "flips") is
version 9, otherwise as 7.
"""
from __future__ import annotations

import base64
import enum
import math
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import __version__
from .checkpoint import LoadedModel
from .checkpoint import tile_multiple
from .codec import (DecodeError, Mode, UnitLayout, _TimedNet, check_tile, layout_for, pixels_digest, torch_threads,
                    unit_size)
from .coding.bitsback import PIXEL_CHUNK, pixel_probs
from .coding.channel import (DEFAULT_INDEX_BITS, DEFAULT_KL_PER_CHUNK, DEFAULT_LAYOUT, LAYOUTS, StepChannel, chunk_count, kl_bits,
                             pack_indices, packed_bytes, unpack_indices)
from .coding.container import (LOSSY_EVEN_VERSION, LOSSY_FLIPS_VERSION, LOSSY_LEARNED_VERSION, LOSSY_PREDICTED_VERSION,
                               LOSSY_VERSION, FormatError, header_flips, pack_names, pack_segments, unpack_names,
                               unpack_segments)
from .coding.entropy import Stack
from .diffusion import LearnedVariance, VarianceType, ddim_sample, p_step, sample
from .schedule import Schedule, jump_costs, schedule_from_spec

DEFAULT_LOSSY_STEPS = 100
DEFAULT_LOSSY_BATCH = 256
MAX_INDEX_BITS = 24
DIGEST_HEX_V3 = 32  # version 3 keeps the first 128 bits of the pixels' SHA-256 (the seed and the exactness check)
COUNT_TOLERANCE = 0.05  # the encoder takes the predicted chunk count while it keeps the KL per chunk within 5 %


class Reconstruct(enum.Enum):
    PREDICT = "predict"  # x̂_0(x_t) = (x_t − √(1−ᾱ_t) ε_θ) / √ᾱ_t, one network call (Algorithm 4's estimate)
    SAMPLE = "sample"  # ancestral sampling from x_t down to x_0 (Algorithm 2 from t)
    DDIM = "ddim"  # deterministic DDIM from x_t


@dataclass
class Segment:
    step: int  # τ of the x this segment sends; 0 for the lossless tail
    chunks: int  # channel chunks (0 for the tail)
    bytes: int
    kl_bits: float  # KL(q‖p) summed over the step's dimensions; for the tail −log2 p(x_0 | x_1)


@dataclass
class LossyEncodeResult:
    data: bytes
    dims: int
    seconds: float
    net_seconds: float
    channel_seconds: float
    segments: list[Segment]
    header_bytes: int
    complete: bool  # the lossless tail is in the file
    recon: list[np.ndarray] = field(default_factory=list)  # per segment: x̂_0 units uint8 (if asked)

    @property
    def bits_per_dim(self) -> float:
        return 8 * len(self.data) / self.dims


@dataclass
class LossyDecodeResult:
    images: list  # [(name, uint8 [H, W, C])]
    bits_per_dim: float  # of the bytes read: header and the segments used
    seconds: float
    step: int  # τ of the x_t reconstructed from (0: exact pixels)
    segments_read: int
    segments_in_file: int
    truncated: bool
    exact: bool


def _check(b: bytes) -> str:
    """A segment's check: the low byte of its CRC-32, as two hex digits. A complete file's payload
    has its own CRC-32, so these only guard files cut short; empty segments have none."""
    return f"{zlib.crc32(b) & 0xFF:02x}"


def _seed(digest: str) -> int:
    """The channel's shared seed, from the original pixels' SHA-256 (in the header anyway)."""
    return int(digest[:15], 16)


class _Chain:
    """The model's reverse step over all units of a file, in fixed network batches: ``shapes``
    are the groups of units of one shape each ([n, C, h, w]; ``codec.UnitLayout``), laid end to
    end in the flat arrays; each group runs in batches of at most ``batch`` units."""

    def __init__(self, net, sched: Schedule, variance: np.ndarray, shapes: list[tuple[int, ...]], batch: int):
        self.net, self.sched, self.variance, self.shapes = net, sched, variance, [tuple(s) for s in shapes]
        sizes = [int(np.prod(s)) for s in self.shapes]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist()
        self.spans = [(g, a, min(s[0], a + batch)) for g, s in enumerate(self.shapes) for a in range(0, s[0], batch)]

    @property
    def size(self) -> int:
        return self.offsets[-1]

    def split(self, flat: np.ndarray) -> list[np.ndarray]:
        """A flat array over all units -> per group [n, C, h, w]."""
        return [flat[a:b].reshape(s) for a, b, s in zip(self.offsets, self.offsets[1:], self.shapes)]

    def batches(self, flat: np.ndarray):
        """(group, first, end, the batch's units) of a flat array, in network order."""
        parts = self.split(flat)
        for g, a, b in self.spans:
            yield g, a, b, parts[g][a:b]

    @property
    def learned(self) -> bool:
        return isinstance(self.variance, LearnedVariance)

    def p(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, "float | np.ndarray"]:
        """(mean of p_θ(x_{k−1} | x_k), clipped x̂_0, its σ), from x_k flat float64: flat float64
        arrays; σ one number, or one per dimension with a learned variance."""
        mean, x0 = np.empty(self.size), np.empty(self.size)
        var = np.empty(self.size) if self.learned else None
        outs = [self.split(a) if a is not None else None for a in (mean, x0, var)]
        with torch.no_grad():
            for g, a, b, xb in self.batches(x):
                kk = torch.full((b - a,), k, dtype=torch.int64)
                st = p_step(self.net, self.sched, torch.from_numpy(np.ascontiguousarray(xb)), kk, self.variance)
                outs[0][g][a:b], outs[1][g][a:b] = st.mean.numpy(), st.pred_x0.numpy()
                if var is not None:
                    outs[2][g][a:b] = st.var.to(torch.float64).numpy()
        std = np.sqrt(var) if var is not None else math.sqrt(self.variance[k])
        return mean, x0, std

    def kl_weight(self, std: "float | np.ndarray", k: int) -> np.ndarray | None:
        """Each dimension's predicted KL of step k (up to a factor), from the learned σ alone —
        E KL = ½ log(σ²/β̃) where σ² = β̃ + E(μ_q − μ_p)² — for balanced chunks; None without."""
        if not self.learned:
            return None
        return np.log(np.square(std) / self.sched.beta_tilde[k])


def _lossy_variance(model, var_type: VarianceType | None) -> VarianceType:
    """The model's default: its learned variance (one σ per dimension, version-4 files) if it
    has one, else one σ per step."""
    return model.default_variance() if var_type is None else var_type


def _u8(x0: np.ndarray) -> np.ndarray:
    return np.clip(np.rint((x0 + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _layout(model: LoadedModel, shapes: list[tuple[int, int]]) -> UnitLayout:
    """A new file's unit layout: even sides where padded tiles would pad (version 7); no ramp
    (that is bits-back's)."""
    return layout_for(model, shapes, unit_size(model, shapes), ramp=False)


def _units(model: LoadedModel, images: list[tuple[str, np.ndarray]]) -> tuple[UnitLayout, list[np.ndarray]]:
    """The file's unit layout and its units by group (``codec.UnitLayout.cut``)."""
    layout = _layout(model, [im.shape[:2] for _, im in images])
    return layout, layout.cut([im for _, im in images])


def paste_flat(layout: UnitLayout, flat: np.ndarray, shapes: list[tuple[int, int]], channels: int) -> list[np.ndarray]:
    """Values laid out flat over a file's units (group after group) -> the images."""
    groups = unit_groups(layout, shapes, channels)
    ends = np.cumsum([int(np.prod(g)) for g in groups])[:-1]
    return layout.paste([a.reshape(g) for a, g in zip(np.split(flat, ends), groups)], shapes, channels)


def recorded_images(model: LoadedModel, images: list[tuple[str, np.ndarray]], flat: np.ndarray) -> list[np.ndarray]:
    """A reconstruction ``encode_lossy(record=True)`` kept (flat, over the file's units) -> the images."""
    shapes = [im.shape[:2] for _, im in images]
    return paste_flat(_layout(model, shapes), flat, shapes, images[0][1].shape[2])


def _shapes(h: dict) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in h["shapes"]]


def file_layout(h: dict, model: LoadedModel) -> UnitLayout:
    """The unit layout a lossy file's header names (even sides in versions 7 and 9, padded tiles before)."""
    even = h["_version"] in (LOSSY_EVEN_VERSION, LOSSY_FLIPS_VERSION)
    return UnitLayout(int(h["tile"]), tile_multiple(model.config), even)


def unit_groups(layout: UnitLayout, shapes: list[tuple[int, int]], channels: int) -> list[tuple[int, ...]]:
    """[n, C, h, w] of each group of a layout's units."""
    return [(len(m), channels, a, b) for (a, b), m in layout.groups(shapes)]


def _chain_index(sched: Schedule, t: int) -> int:
    """Chain index k of the smallest chain step τ_k ≥ t (t ≥ 1)."""
    steps = sched.timesteps
    k = int(np.searchsorted(steps[1:], t, side="left")) + 1
    return min(k, sched.K)


def segment_steps(sched: Schedule) -> list[int]:
    """τ of each segment in file order: τ_K, τ_{K−1}, …, τ_1, then 0 for the tail."""
    return [int(sched.timesteps[k]) for k in range(sched.K, 0, -1)] + [0]


class ChunkCounts:
    """Chunk counts both sides predict, so the header holds only their differences (mostly 0).

    The model's calibration gives each step's expected KL (``schedule.jump_costs``, bits per
    dimension); the count predicted for segment s ≥ 1 is that KL times the file's running ratio
    of coded to expected KL over the segments before it, divided by the KL per chunk. The
    encoder takes the prediction whenever it keeps the step's KL per chunk within
    ``COUNT_TOLERANCE`` (on 100 digits the steps' KL follows the expectation to 2.4 %), so
    K counts cost a few bytes instead of ~1.5 each. Segment 0 (x_T) is predicted empty."""

    def __init__(self, model: LoadedModel, sched: Schedule, dims: int, kl_per_chunk: float):
        steps = np.array(segment_steps(sched)[:-1])  # τ_K … τ_1: segment s ≥ 1 is the jump steps[s−1] → steps[s]
        self.expected = dims * jump_costs(model.schedule, model.x0_mse, steps[:-1], steps[1:])
        self.dims, self.kpc = dims, kl_per_chunk
        self.coded = self.exp_sum = 0.0

    @classmethod
    def of(cls, model: LoadedModel, sched: Schedule, dims: int, kl_per_chunk: float) -> "ChunkCounts | None":
        return cls(model, sched, dims, kl_per_chunk) if model.x0_mse is not None else None

    def predict(self, seg: int) -> int:
        if seg == 0:
            return 0
        prior = 4.0 * self.kpc  # four chunks' worth of KL at ratio 1 before any evidence
        ratio = (self.coded + prior) / (self.exp_sum + prior)
        return min(chunk_count(ratio * float(self.expected[seg - 1]), self.kpc), self.dims)

    def record(self, seg: int, count: int) -> None:
        if seg > 0:
            self.coded += count * self.kpc
            self.exp_sum += float(self.expected[seg - 1])

    def choose(self, seg: int, kl: float) -> tuple[int, int]:
        """The encoder's (count, count − prediction) for a segment carrying ``kl`` bits."""
        pred = self.predict(seg)
        n = min(chunk_count(kl, self.kpc), self.dims)
        if pred >= 1 and abs(kl / pred - self.kpc) <= COUNT_TOLERANCE * self.kpc:
            n = pred
        self.record(seg, n)
        return n, n - pred

    def replay(self, residuals: list[int]) -> list[int]:
        """The decoder's counts from the header's differences."""
        out = []
        for seg, r in enumerate(residuals):
            n = self.predict(seg) + int(r)
            if not 0 <= n <= self.dims:
                raise FormatError("header: bad chunk counts")
            self.record(seg, n)
            out.append(n)
        return out


def encode_lossy(
    images: list[tuple[str, np.ndarray]],
    model: LoadedModel,
    steps: int | None = DEFAULT_LOSSY_STEPS,
    var_type: VarianceType | None = None,
    stop_step: int | None = None,
    rate: float | None = None,
    index_bits: int = DEFAULT_INDEX_BITS,
    kl_per_chunk: float = DEFAULT_KL_PER_CHUNK,
    batch: int = DEFAULT_LOSSY_BATCH,
    temperature: float = 0.0,
    spacing: str | None = None,
    layout: str = DEFAULT_LAYOUT,
    record: bool = False,
    progress: Callable[[int], None] | None = None,
    flips: str | None = None,
) -> LossyEncodeResult:
    """Encode named uint8 images [H, W, C] progressively. ``stop_step`` t: end the file with x_t
    (the smallest chain step ≥ t; 0 or None: the whole chain and the lossless tail). ``rate`` R:
    keep the longest prefix of segments whose file is at most R bits/dim (at least segment 0).
    ``record``: keep each segment's reconstruction x̂_0(x_t) (for rate–distortion reports).
    ``flips``: the network's flip ensemble (default the model's; one writes format version 9)."""
    t0 = time.perf_counter()
    flips = model.flips_or_default(flips)
    var_type = _lossy_variance(model, var_type)
    if not 1 <= index_bits <= MAX_INDEX_BITS:
        raise ValueError(f"index bits must be in 1..{MAX_INDEX_BITS}")
    if layout not in LAYOUTS or (layout == "rows" and index_bits > 16):
        raise ValueError(f"candidate layout {layout!r} with {index_bits} index bits: use window, or rows with ≤ 16")
    if not 0 < kl_per_chunk <= 2 * index_bits:
        raise ValueError("the KL per chunk must be positive and at most twice the index bits")
    C = model.channels
    for name, im in images:
        if im.ndim != 3 or im.shape[2] != C or im.dtype != np.uint8:
            raise ValueError(f"{name}: {im.shape[-1] if im.ndim == 3 else '?'}-channel image, the model takes {C}")
    cut, groups = _units(model, images)
    sched = model.chain(steps, spacing)
    K = sched.K
    k_stop = 0 if not stop_step else _chain_index(sched, int(stop_step))
    var = model.variance(sched, var_type)
    timed = _TimedNet(model.network(flips))
    chain = _Chain(timed, sched, var, [g.shape for g in groups], batch)
    threads = torch.get_num_threads()
    digest = pixels_digest([im for _, im in images])
    seed = _seed(digest)
    units = np.concatenate([g.reshape(-1) for g in groups])
    x0 = units.astype(np.float64) * (2.0 / 255.0) - 1.0
    dims = sum(im.size for _, im in images)
    header = {
        "mode": Mode.LOSSY.value, "encoder": f"ddpm-codec {__version__}", "model": model.model_id,
        "schedule": model.chain_spec(steps, spacing), "variance": var_type.value, "threads": threads, "batch": batch,
        "tile": cut.size, "channels": C, "names": pack_names([n for n, _ in images]),
        "shapes": [[int(im.shape[0]), int(im.shape[1])] for _, im in images],
        "pixels_sha256": digest, "index_bits": index_bits,
    }
    if layout != "rows":  # files before the window layout have no key: rows
        header["candidates"] = layout
    if flips != "none":
        header["flips"] = flips
    counts = ChunkCounts.of(model, sched, x0.size, kl_per_chunk)
    if counts is not None:
        header["kl_per_chunk"] = kl_per_chunk
    residuals: list[int] = []
    segs: list[Segment] = []
    bodies: list[bytes] = []
    recon: list[np.ndarray] = []
    ch_seconds = 0.0

    def n_chunks(kl: float) -> int:
        if counts is None:
            return min(chunk_count(kl, kl_per_chunk), x0.size)
        n, r = counts.choose(len(residuals), kl)
        residuals.append(r)
        return n

    def file_bytes(tail: bool) -> bytes:
        n = sum(1 for s in segs if s.step > 0)
        checks = "".join(_check(b) for b in bodies if b)
        h = dict(header, tail=tail)
        if counts is None and not chain.learned and not cut.even and flips == "none":
            h.update(chunks=[s.chunks for s in segs if s.step > 0], checks=checks)
            return pack_segments(h, b"".join(bodies), LOSSY_VERSION)
        if counts is None:  # (a model not calibrated: counts listed, in a version-4 or -7 file)
            h.update(chunks=[s.chunks for s in segs if s.step > 0])
        else:
            h.update(chunks_vs_expected=residuals[:n])
        h.update(checks=base64.b64encode(bytes.fromhex(checks)).decode("ascii"), pixels_sha256=digest[:DIGEST_HEX_V3])
        version = (LOSSY_FLIPS_VERSION if flips != "none" else LOSSY_EVEN_VERSION if cut.even else
                   LOSSY_LEARNED_VERSION if chain.learned else LOSSY_PREDICTED_VERSION)
        return pack_segments(h, b"".join(bodies), version)

    def add(seg: Segment, body: bytes, tail: bool = False) -> bool:
        """Append a segment; False (and not appended) if it would break the rate limit."""
        segs.append(seg)
        bodies.append(body)
        if rate is not None and len(segs) > 1 and 8 * len(file_bytes(tail)) / dims > rate:
            segs.pop()
            bodies.pop()
            return False
        return True

    with torch_threads(threads):
        # segment 0: x_T against N(0, I)
        ab = sched.alpha_bar[K]
        mu_q, s_q = math.sqrt(ab) * x0, math.sqrt(1.0 - ab)
        zero = np.zeros_like(x0)
        kl = float(kl_bits(mu_q, s_q, zero, 1.0).sum())
        c0 = time.perf_counter()
        ch = StepChannel(seed, 0, index_bits, temperature, threads, layout)
        idx, x = ch.encode(mu_q, s_q, zero, 1.0, n_chunks(kl))
        ch_seconds += time.perf_counter() - c0
        add(Segment(int(sched.timesteps[K]), idx.size, packed_bytes(idx.size, index_bits), kl),
            pack_indices(idx, index_bits))
        if progress:
            progress(1)
        complete = False
        for k in range(K, 0, -1):
            mean, pred, s_p = chain.p(x, k)
            if record:
                recon.append(_u8(pred))
            if k == k_stop:
                break
            if k >= 2:
                post = sched.post_coef_x0[k] * x0 + sched.post_coef_xt[k] * x
                s_q = math.sqrt(sched.beta_tilde[k])
                kl = float(kl_bits(post, s_q, mean, s_p).sum())
                c0 = time.perf_counter()
                ch = StepChannel(seed, K - k + 1, index_bits, temperature, threads, layout)
                idx, x_new = ch.encode(post, s_q, mean, s_p, n_chunks(kl), chain.kl_weight(s_p, k))
                ch_seconds += time.perf_counter() - c0
                if not add(Segment(int(sched.timesteps[k - 1]), idx.size, packed_bytes(idx.size, index_bits), kl),
                           pack_indices(idx, index_bits)):
                    break
                x = x_new
            else:  # the tail: x_0 exactly with the L_0 decoder
                c0 = time.perf_counter()
                u = units.astype(np.int64)
                scale = _tail_scale(u, mean, s_p)
                header["tail_scale"] = scale
                std = s_p * scale
                stack = Stack()
                nll = 0.0
                starts = list(range(0, u.size, PIXEL_CHUNK))
                for s in reversed(starts):
                    probs = pixel_probs(mean[s:s + PIXEL_CHUNK], _part(std, s))
                    picked = probs[np.arange(probs.shape[0]), u[s:s + PIXEL_CHUNK]]
                    nll -= float(np.log2(np.maximum(picked, 2.0**-24)).sum())  # the coder's floor, about
                    stack.push_categorical(u[s:s + PIXEL_CHUNK], probs)
                body = stack.words().astype("<u4").tobytes()
                ch_seconds += time.perf_counter() - c0
                if add(Segment(0, 0, len(body), nll), body, tail=True):
                    complete = True
                    if record:
                        recon.append(units.copy())
            if progress:
                progress(1)
    data = file_bytes(complete)
    body_len = sum(len(b) for b in bodies)
    return LossyEncodeResult(data=data, dims=dims, seconds=time.perf_counter() - t0, net_seconds=timed.seconds,
                             channel_seconds=ch_seconds, segments=segs, header_bytes=len(data) - body_len,
                             complete=complete, recon=recon)


def exact_chain_kl(
    images: list[tuple[str, np.ndarray]],
    model: LoadedModel,
    steps: int | None = DEFAULT_LOSSY_STEPS,
    var_type: VarianceType | None = None,
    spacing: str | None = None,
    batch: int = DEFAULT_LOSSY_BATCH,
    seed: int = 0,
    flips: str | None = None,
) -> list[float]:
    """The rate the paper computes (its Table 4): per segment of ``encode_lossy``'s file, the KL
    in bits with x_t drawn exactly from q (not through the channel): KL(q(x_T|x_0) ‖ N(0, I)),
    then KL(q(x_{t−1}|x_t, x_0) ‖ p_θ(x_{t−1}|x_t)) per step, then −log2 p_θ(x_0|x_1) with the
    L_0 decoder. Their sum is the variational bound of this chain on these images (one sample)."""
    var_type = _lossy_variance(model, var_type)
    _, groups = _units(model, images)
    units = np.concatenate([g.reshape(-1) for g in groups])
    sched = model.chain(steps, spacing)
    K = sched.K
    var = model.variance(sched, var_type)
    chain = _Chain(model.network(flips), sched, var, [g.shape for g in groups], batch)
    rng = np.random.default_rng(seed)
    x0 = units.astype(np.float64) * (2.0 / 255.0) - 1.0
    ab = sched.alpha_bar[K]
    out = [float(kl_bits(math.sqrt(ab) * x0, math.sqrt(1.0 - ab), np.zeros_like(x0), 1.0).sum())]
    x = math.sqrt(ab) * x0 + math.sqrt(1.0 - ab) * rng.standard_normal(x0.size)
    for k in range(K, 1, -1):
        mean, _, s_p = chain.p(x, k)
        post = sched.post_coef_x0[k] * x0 + sched.post_coef_xt[k] * x
        s_q = math.sqrt(sched.beta_tilde[k])
        out.append(float(kl_bits(post, s_q, mean, s_p).sum()))
        x = post + s_q * rng.standard_normal(x0.size)
    mean, _, s_p = chain.p(x, 1)
    out.append(_pixel_bits(units.astype(np.int64), mean, s_p))
    return out


def _part(std: "float | np.ndarray", a: int) -> "float | np.ndarray":
    """The σ of pixels a … a + PIXEL_CHUNK − 1: one number, or their slice of a per-pixel array."""
    return std[a:a + PIXEL_CHUNK] if np.ndim(std) else std


def _pixel_bits(u: np.ndarray, mean: np.ndarray, std: "float | np.ndarray") -> float:
    """−log2 of pixels ``u`` under the L_0 decoder (discretized Gaussians), at the coder's floor."""
    bits = 0.0
    for a in range(0, u.size, PIXEL_CHUNK):
        probs = pixel_probs(mean[a:a + PIXEL_CHUNK], _part(std, a))
        bits -= float(np.log2(np.maximum(probs[np.arange(probs.shape[0]), u[a:a + PIXEL_CHUNK]], 2.0**-24)).sum())
    return bits


TAIL_SCALES = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0)


def _tail_scale(u: np.ndarray, mean: np.ndarray, std: "float | np.ndarray", n: int = 1 << 15) -> float:
    """The decoder's std for the tail, as a multiple of σ_1: x_1 reached through the channel is
    further from x_0 than a true draw of q, so a wider L_0 decoder codes x_0 cheaper. The encoder
    picks the scale of least code length on (at most) ``n`` evenly spread pixels; it goes in the header."""
    sel = np.linspace(0, u.size - 1, min(n, u.size)).astype(np.int64)
    std = std[sel] if np.ndim(std) else std
    return min(TAIL_SCALES, key=lambda sc: _pixel_bits(u[sel], mean[sel], std * sc))


@dataclass
class _Parsed:
    header: dict
    body: bytes
    complete_file: bool
    sched: Schedule
    steps: list[int] | None  # τ per segment present in the header, in file order
    sizes: list[int] | None  # bytes per segment
    chunks: list[int] | None  # (None: predicted counts without the model to predict them)
    checks: list[str | None] | None  # per segment; None for an empty one


def _parse(data: bytes, model: LoadedModel | None = None, strict: bool = False) -> _Parsed:
    """The file's structure. Optimal steps (named, not listed, in the header) need the file's
    ``model`` to know their step numbers; without it ``steps`` holds -1 for every channel
    segment. Another model is ignored, or refused if ``strict`` (decoding). Chunk counts stored
    as differences from the model's prediction (version 3) need the model too: without it the
    segments stay unknown (None)."""
    h, body, complete = unpack_segments(data)
    if model is not None and h.get("model") != model.model_id:
        if strict:
            raise DecodeError(f"the file was made with model {h.get('model')}, not {model.model_id}")
        model = None
    try:
        if h["mode"] != Mode.LOSSY.value:
            raise FormatError(f"mode {h['mode']!r} in a segmented file")
        spec = h["schedule"]
        if spec.get("spacing") == "optimal":
            sched = model.chain_from_spec(spec) if model is not None else None
            K = int(spec["K"])
        else:
            sched = schedule_from_spec(spec)
            K = sched.K
        bits = int(h["index_bits"])
        if "chunks_vs_expected" in h:
            residuals = [int(c) for c in h["chunks_vs_expected"]]
            kpc = float(h["kl_per_chunk"])
            if len(residuals) > K or not 0 < kpc <= 2 * MAX_INDEX_BITS:
                raise FormatError("header: bad channel parameters")
            if model is None or sched is None or model.x0_mse is None:
                return _Parsed(h, body, complete, sched, None, None, None, None)
            dims = sum(int(np.prod(g)) for g in unit_groups(file_layout(h, model), _shapes(h), int(h["channels"])))
            chunks = ChunkCounts(model, sched, dims, kpc).replay(residuals)
        else:
            chunks = [int(c) for c in h["chunks"]]
        checks = str(h["checks"])
        if h["_version"] != LOSSY_VERSION:  # base64 of the check bytes (hex in version 2)
            checks = base64.b64decode(checks.encode("ascii"), validate=True).hex()
        tail = bool(h["tail"])
        if not 1 <= bits <= MAX_INDEX_BITS or len(chunks) > K or min(chunks, default=0) < 0:
            raise FormatError("header: bad channel parameters")
        if tail and len(chunks) != K:
            raise FormatError("header: a tail without the whole chain")
        sizes = [packed_bytes(c, bits) for c in chunks]
        if tail:
            sizes.append(h["payload_bytes"] - sum(sizes))
            if sizes[-1] < 0 or sizes[-1] % 4:
                raise FormatError("header: segment sizes do not add up to the payload")
        elif sum(sizes) != h["payload_bytes"]:
            raise FormatError("header: segment sizes do not add up to the payload")
        steps = (segment_steps(sched) if sched is not None else [-1] * K + [0])[:len(sizes)]
        if tail:
            steps[-1] = 0
        if len(checks) != 2 * sum(1 for n in sizes if n):
            raise FormatError("header: segment checks do not match the segments")
        it = iter(checks[i:i + 2] for i in range(0, len(checks), 2))
        return _Parsed(h, body, complete, sched, steps, sizes, chunks, [next(it) if n else None for n in sizes])
    except (KeyError, TypeError, ValueError) as e:  # (binascii.Error is a ValueError)
        if isinstance(e, FormatError):
            raise
        raise FormatError(f"malformed header ({type(e).__name__}: {e})") from None


def lossy_info(data: bytes, model: LoadedModel | None = None) -> dict:
    """Segments and sizes; the step numbers of optimal chains need the file's ``model``."""
    p = _parse(data, model)
    h = p.header
    dims = sum(a * b for a, b in h["shapes"]) * int(h["channels"])
    head = len(data) - len(p.body) - (4 if p.complete_file else 0)
    cum, rows = head + 4, []
    for s, n, c in zip(p.steps or [], p.sizes or [], (p.chunks or []) + [0]):
        cum += n
        rows.append({"step": s, "bytes": n, "chunks": c, "bits_per_dim": 8 * cum / dims})
    return {
        "format_version": h["_version"], "mode": h["mode"], "model": h["model"],
        "images": [{"name": n, "height": s[0], "width": s[1]} for n, s in zip(unpack_names(h["names"]), h["shapes"])],
        "steps": p.sched.steps if p.sched is not None else None, "K": h["schedule"].get("K", p.sched.K if p.sched is not None else None),
        "spacing": h["schedule"].get("spacing", "listed"), "schedule": h["schedule"]["kind"], "T": h["schedule"]["T"],
        "variance": h["variance"], "index_bits": h["index_bits"], "bytes": len(data),
        "flips": header_flips(h, LOSSY_FLIPS_VERSION),
        "segments": rows if p.sizes is not None else None,  # None: its chunk counts need the model
        "lossless_tail": bool(h["tail"]), "truncated": not p.complete_file,
    }


def decode_lossy(
    data: bytes,
    model: LoadedModel,
    upto_step: int | None = None,
    reconstruct: Reconstruct = Reconstruct.PREDICT,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> LossyDecodeResult:
    """Decode down to x_t (t = ``upto_step``: the smallest coded step ≥ t; None: as far as the
    file goes) and reconstruct; with the tail (t = 0) the exact pixels, checked against the
    original's SHA-256. A short file decodes up to its last whole segment."""
    t0 = time.perf_counter()
    p = _parse(data, model, strict=True)
    h = p.header
    try:
        size, C = int(h["tile"]), int(h["channels"])
        if C != model.channels:
            raise DecodeError("the file's tile shape does not fit the model")
        check_tile(size, model)  # units smaller than the model's: images that fit in one (``unit_size``)
        shapes = _shapes(h)
        names = unpack_names(h["names"])
        if len(names) != len(shapes):
            raise FormatError("header: names and shapes differ in number")
        cut = file_layout(h, model)
        groups = unit_groups(cut, shapes, C)
        seed_file, bits = _seed(str(h["pixels_sha256"])), int(h["index_bits"])
        layout = str(h.get("candidates", "rows"))
        if layout not in LAYOUTS:
            raise FormatError(f"header: unknown candidate layout {layout!r}")
        threads, batch = int(h["threads"]), int(h["batch"])
        var_type = VarianceType(h["variance"])
        flips = header_flips(h, LOSSY_FLIPS_VERSION)
        if h["_version"] not in (LOSSY_EVEN_VERSION, LOSSY_FLIPS_VERSION) and (var_type is VarianceType.LEARNED) != (h["_version"] == LOSSY_LEARNED_VERSION):
            raise FormatError(f"header: variance {var_type.value} in a version-{h['_version']} file")
        var = model.variance(p.sched, var_type)
        tail_scale = float(h["tail_scale"]) if h["tail"] else 1.0
        if not 0.1 <= tail_scale <= 100:
            raise FormatError("header: bad tail scale")
        if batch < 1 or max(p.chunks, default=0) > sum(int(np.prod(g)) for g in groups):
            raise FormatError("header: bad batch or chunk count")
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, (DecodeError, FormatError)):
            raise
        raise FormatError(f"malformed header ({type(e).__name__}: {e})") from None
    # which segments are here, whole and intact
    offsets = np.concatenate([[0], np.cumsum(p.sizes)]).astype(int)
    whole = 0
    while whole < len(p.sizes) and offsets[whole + 1] <= len(p.body):
        seg = p.body[offsets[whole]:offsets[whole + 1]]
        if p.checks[whole] is not None and _check(seg) != p.checks[whole]:
            raise FormatError(f"segment {whole} (step {p.steps[whole]}) fails its checksum: the file is corrupt")
        whole += 1
    if whole == 0:
        raise FormatError("truncated file: not even the first segment is whole")
    want = whole
    if upto_step is not None:
        t = int(upto_step)
        want = min(whole, 1 + sum(1 for s in p.steps[1:] if s >= t)) if t > 0 else whole
    sched, K = p.sched, p.sched.K
    net = model.network(flips)
    chain = _Chain(net, sched, var, groups, batch)
    D = chain.size
    exact = False
    try:
        with torch_threads(threads):
            x = StepChannel(seed_file, 0, bits, workers=threads, layout=layout).decode(unpack_indices(p.body[:offsets[1]], p.chunks[0], bits),
                                                       np.zeros(D), 1.0)
            if progress:
                progress(1)
            k = K  # x holds x_{τ_k}
            mean = pred = None
            for s in range(1, want):
                mean, pred, s_p = chain.p(x, k)
                seg = p.body[offsets[s]:offsets[s + 1]]
                if p.steps[s] > 0:
                    idx = unpack_indices(seg, p.chunks[s], bits)
                    x = StepChannel(seed_file, s, bits, workers=threads, layout=layout).decode(
                        idx, mean, s_p, chain.kl_weight(s_p, k))
                    k -= 1
                    mean = pred = None
                else:  # the tail
                    stack = Stack(np.frombuffer(seg, dtype="<u4"))
                    std = s_p * tail_scale
                    parts = [stack.pop_categorical(pixel_probs(mean[a:a + PIXEL_CHUNK], _part(std, a)))
                             for a in range(0, D, PIXEL_CHUNK)]
                    if stack.words().size:
                        raise DecodeError("the lossless tail did not end where it should: the file is corrupt")
                    u = np.concatenate(parts).astype(np.uint8)
                    exact = True
                if progress:
                    progress(1)
            if not exact:
                if reconstruct is Reconstruct.PREDICT:
                    if pred is None:
                        _, pred, _ = chain.p(x, k)
                    u = _u8(pred)
                else:
                    gen = torch.Generator().manual_seed(seed)
                    outs = []
                    for g, a, b, xb in chain.batches(x):
                        kw = dict(x_start=torch.from_numpy(np.ascontiguousarray(xb)), from_k=k)
                        if reconstruct is Reconstruct.SAMPLE:
                            outs.append(sample(net, sched, xb.shape, gen, var, **kw))
                        else:
                            outs.append(ddim_sample(net, sched, xb.shape, gen, **kw))
                    u = _u8(np.concatenate([o.to(torch.float64).numpy().reshape(-1) for o in outs]))
    except ValueError as e:
        if isinstance(e, (DecodeError, FormatError)):
            raise
        raise DecodeError(f"the payload does not decode ({e})") from None
    images = list(zip(names, paste_flat(cut, u, shapes, C)))
    want_digest = str(h["pixels_sha256"])
    if exact and (len(want_digest) < DIGEST_HEX_V3 or not pixels_digest([im for _, im in images]).startswith(want_digest)):
        raise DecodeError("decoded pixels do not match the original's checksum; nothing was written")
    dims = sum(im.size for _, im in images)
    head = len(data) - len(p.body) - (4 if p.complete_file else 0)
    read = head + int(offsets[want]) + 4  # as the file that stops there (with its final CRC)
    return LossyDecodeResult(images=images, bits_per_dim=8 * read / dims, seconds=time.perf_counter() - t0,
                             step=p.steps[want - 1], segments_read=want, segments_in_file=len(p.sizes),
                             truncated=whole < len(p.sizes), exact=exact)
