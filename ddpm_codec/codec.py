"""Public API: lossless encode/decode of images with a trained diffusion model.

Images become units of the model's size (an image of that size is one unit; a
larger one is cut into tiles, edge tiles padded by repeating the last row and
column; padded pixels are coded but not counted). The network is fully
convolutional, so tiles may be larger than the images it was trained on
(``tile``; format version 5): a 64×64 unit lets the network see across the edges
that 32×32 tiles cut. Units are coded in batches
chained on one ANS stack (``coding.bitsback``), so the initial bits are paid once
per file. The network may run as a flip ensemble (``diffusion.FlipEnsemble``: the
outputs for the image and its mirror averaged; format version 8).
"""
from __future__ import annotations

import contextlib
import enum
import hashlib
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import __version__
from .checkpoint import MAX_TILE, LoadedModel, takes_tile, tile_multiple
from .coding.bitsback import ChainCoder
from .coding.container import (LOSSLESS_ADAPTED_VERSION, LOSSLESS_COUPLED_VERSION, LOSSLESS_EVEN_VERSION,
                               LOSSLESS_FLIPS_VERSION, LOSSLESS_SCALED_VERSION, LOSSLESS_SPLIT_VERSION, header_adapt,
                               header_spatial, header_var_scale,
                               LOSSLESS_TILED_VERSION, LOSSLESS_VERSION, Container, FormatError, header_coupling,
                               header_flips, pack_names, unpack_names)
from . import adapt as adaptation
from . import coupling as colour
from . import spatial as split
from . import varscale
from .coding.entropy import Stack
from .diffusion import VarianceType
from .schedule import schedule_from_spec

SEED_WORDS_RNG = 0x5EED  # the stack's initial words: a fixed PCG64 stream both sides know
DEFAULT_STEPS = 100
# b of bits-back's latent grid for every model. Shipped models, 1000 test images, K = 100: b = 1 / 0
# net 1.0385 / 1.0855 (MNIST), 2.890 / 2.932 (Fashion); b = 2 1.0360 (MNIST) but 0.22 bits/dim of
# initial bits with the ramp of before. Cosine-schedule models had b = 0 while the batch ramp
# borrowed ≈ 36 units' dip at b = 1 (28,128 initial bits on 1000 MNIST digits); the ramp of
# ⌊1.1^i⌋ borrows one unit's, 6,208.
DEFAULT_GRID_BITS = 1
DEFAULT_BATCH = 100


class Mode(enum.Enum):
    LOSSLESS = "lossless"
    LOSSY = "lossy"  # progressive (``lossy.py``)


class DecodeError(ValueError):
    """A file that does not decode to its original; the message is one line."""


@dataclass
class EncodeResult:
    data: bytes
    dims: int  # pixel values of the original images (H·W·C summed)
    initial_bits: int  # bits the chain borrowed before its first pops (inside ``data``)
    seconds: float
    net_seconds: float
    variance: str = ""  # the VarianceType used
    header_bytes: int = 0  # magic, version, header and checksums: everything but the payload words
    adapt_seconds: float = 0.0  # fine-tuning the network to the images (``adapt``; within ``seconds``)
    adapt_bits: int = 0  # the network's coded changes (within ``data``)

    @property
    def bits_per_dim(self) -> float:
        return 8 * len(self.data) / self.dims


@dataclass
class DecodeResult:
    images: list  # [(name, uint8 [H, W, C])]
    bits_per_dim: float
    seconds: float


def seed_words(n: int) -> np.ndarray:
    return np.random.Generator(np.random.PCG64(SEED_WORDS_RNG)).integers(0, 1 << 32, n, dtype=np.uint32)


def pixels_digest(images: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for im in images:
        h.update(str(im.shape).encode())
        h.update(np.ascontiguousarray(im, dtype=np.uint8).tobytes())
    return h.hexdigest()


def check_tile(tile: int, model: LoadedModel) -> int:
    """``tile`` if the model can code units of tile × tile, else ValueError with one line."""
    if not takes_tile(tile, model.config):
        raise ValueError(f"tile {tile}: the model takes tiles that are multiples of "
                         f"{tile_multiple(model.config)}, up to {MAX_TILE}")
    return tile


def unit_size(model: LoadedModel, shapes: list[tuple[int, int]], tile: int | None = None) -> int:
    """The side of the units images of these (height, width)s are cut into: ``tile`` if given, else
    the model's unit (``LoadedModel.unit``: its image size, or the tile its card measured best) —
    or, when every image fits in one unit, the smallest size the network takes that holds the
    largest side (a 32×32 image is one 32×32 unit, not a 64×64 unit of which three quarters are
    padding)."""
    if tile is not None:
        return check_tile(tile, model)
    size, side = model.unit, max(max(int(h), int(w)) for h, w in shapes)
    if side >= size:
        return size
    m = tile_multiple(model.config)
    return max(m, -(-side // m) * m)


def tile_layout(h: int, w: int, size: int) -> tuple[int, int]:
    return math.ceil(h / size), math.ceil(w / size)


def count_tiles(shapes: list[tuple[int, int]], size: int) -> int:
    """Tiles of ``size`` needed for images of the given (height, width)s (in either layout)."""
    return sum(a * b for a, b in (tile_layout(h, w, size) for h, w in shapes))


def even_cuts(length: int, size: int, multiple: int) -> list[int]:
    """The even layout's unit sides along one axis of ``length``: as many units as tiles of
    ``size`` would take, each a multiple of ``multiple`` (what the network takes), as equal as
    possible, larger first; they cover ``length`` rounded up to ``multiple`` (padding < multiple).
    400 pixels in units of 32 (multiple 4): nine of 32 and four of 28, where tiles of 32 pad 16."""
    n, q = -(-length // size), -(-length // multiple)
    base, extra = divmod(q, n)
    return [(base + 1) * multiple] * extra + [base * multiple] * (n - extra)


RAMP_TILES = 2  # a tiled image's first units coded as quarters (``UnitLayout.ramp``)


@dataclass(frozen=True)
class UnitLayout:
    """How a file's images become units: ``size`` × ``size`` tiles with padded edges (versions 1
    and 5), or, ``even``, the same number of units per axis with sides from ``even_cuts`` (version
    6): no unit is more than ``multiple`` − 1 pixels of padding, where a 400 × 600 photo in tiles
    of 64 codes 19 % padding. Units of one shape are coded together, so the file's units are
    grouped by shape: groups in order of decreasing (height, width), units in image order, row
    by row.

    ``ramp`` (version 6): the first image's first ``ramp`` units are each cut into four quarters,
    coded first. Bits-back's first unit borrows its dip from the initial bits, about 5 bits per
    value of a photo unit; quarters borrow a quarter of that, and by the time the first whole
    unit is coded the quarters before it have paid in more than it borrows (64×64 units of
    astronaut + coffee: 59,648 initial bits, 0.04 bits/dim, without)."""

    size: int
    multiple: int
    even: bool
    ramp: int = 0

    def cuts(self, length: int) -> list[int]:
        if self.even:
            return even_cuts(length, self.size, self.multiple)
        return [self.size] * -(-length // self.size)

    def boxes(self, h: int, w: int) -> list[tuple[int, int, int, int]]:
        """(y, x, height, width) of an image's units, row by row."""
        ys, xs = self.cuts(h), self.cuts(w)
        y0, x0 = np.cumsum([0] + ys[:-1]), np.cumsum([0] + xs[:-1])
        return [(int(y), int(x), a, b) for y, a in zip(y0, ys) for x, b in zip(x0, xs)]

    def _halves(self, a: int) -> list[tuple[int, int]]:
        """(offset, side) of a ramp unit's side cut in two multiples of ``multiple`` (if it can be)."""
        if a < 2 * self.multiple:
            return [(0, a)]
        first = -(-a // (2 * self.multiple)) * self.multiple
        return [(0, first), (first, a - first)]

    def groups(self, shapes: list[tuple[int, int]]) -> list[tuple[tuple[int, int], list[tuple[int, tuple]]]]:
        """[((height, width), [(image index, box), …]), …] in coding order: the ramp's quarters,
        then the rest."""
        ramp: dict[tuple[int, int], list] = {}
        rest: dict[tuple[int, int], list] = {}
        for i, (h, w) in enumerate(shapes):
            for j, (y, x, a, b) in enumerate(self.boxes(h, w)):
                if i == 0 and j < self.ramp:
                    for dy, a2 in self._halves(a):
                        for dx, b2 in self._halves(b):
                            ramp.setdefault((a2, b2), []).append((i, (y + dy, x + dx, a2, b2)))
                else:
                    rest.setdefault((a, b), []).append((i, (y, x, a, b)))
        return sorted(ramp.items(), reverse=True) + sorted(rest.items(), reverse=True)

    def cut(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """uint8 [H, W, C] images -> per group, its units [n, C, height, width] (edges padded by
        repeating the last row and column)."""
        padded = []
        for im in images:
            h, w, _ = im.shape
            ph, pw = sum(self.cuts(h)) - h, sum(self.cuts(w)) - w
            padded.append(np.pad(im, ((0, ph), (0, pw), (0, 0)), mode="edge"))
        return [np.ascontiguousarray(np.stack([padded[i][y:y + a, x:x + b].transpose(2, 0, 1)
                                               for i, (y, x, a, b) in members]))
                for _, members in self.groups([im.shape[:2] for im in images])]

    def paste(self, units: list[np.ndarray], shapes: list[tuple[int, int]], channels: int) -> list[np.ndarray]:
        """The inverse of ``cut``: per group its units -> the images."""
        full = [np.empty((sum(self.cuts(h)), sum(self.cuts(w)), channels), dtype=np.uint8) for h, w in shapes]
        for (_, members), u in zip(self.groups(shapes), units):
            for (i, (y, x, a, b)), one in zip(members, u):
                full[i][y:y + a, x:x + b] = one.transpose(1, 2, 0)
        return [np.ascontiguousarray(f[:h, :w]) for f, (h, w) in zip(full, shapes)]


def layout_for(model: LoadedModel, shapes: list[tuple[int, int]], size: int, ramp: bool = True) -> UnitLayout:
    """The layout a new file uses: even where that differs from padded tiles, and (``ramp``:
    bits-back) a ramp when the first image is tiled (lossless version 6, lossy 7); else padded
    tiles, so the file keeps the version older readers read."""
    m = tile_multiple(model.config)
    ny, nx = tile_layout(*shapes[0], size)
    ramp = RAMP_TILES if ramp and ny * nx >= 2 * RAMP_TILES and size >= 2 * m else 0
    even, padded = UnitLayout(size, m, True, ramp), UnitLayout(size, m, False)
    if not ramp and all(even.cuts(n) == padded.cuts(n) for hw in shapes for n in hw):
        return padded
    return even


def count_units(model: LoadedModel, shapes: list[tuple[int, int]], tile: int | None = None) -> int:
    """Units a new lossless file of images of these (height, width)s codes (progress bars)."""
    layout = layout_for(model, shapes, unit_size(model, shapes, tile))
    return sum(len(members) for _, members in layout.groups(shapes))


@contextlib.contextmanager
def torch_threads(n: int):
    """The network's outputs depend on the thread count for small batches (measured), so the
    count is part of the file: both sides run the network with the same number of threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class _TimedNet:
    def __init__(self, net):
        self.net, self.seconds = net, 0.0

    def __call__(self, x, t):
        t0 = time.perf_counter()
        out = self.net(x, t)
        self.seconds += time.perf_counter() - t0
        return out


# Growth of the first batches: a batch may borrow only what the ones before it paid in. A batch's
# stack dips ≈ D bits/dim below its start mid-chain and ends R (the rate) above it (measured on 10
# MNIST digits, K = 100, b = 0: D = 5.6 with the calibrated variance, 5.8 with the learned one; on
# 1000 digits the initial bits put D near 7 at b = 1). Growing by r, the batches before one hold
# ≈ 1/(r − 1) times its size, so r ≤ 1 + R/D keeps them ahead and the initial bits are one unit's
# dip. Sizes are ⌊r^i⌋, so the first batches repeat size 1 until the stack can carry two: growing
# by at least one unit per batch (the previous ramp: 1, 2, 3, …, then ×1.15) borrowed ≈ 19 units'
# worth at b = 0 and 36 at b = 1 (measured on 1000 digits: 14,592 and 28,128 initial bits).
# Old files list their batches.
RAMP = 1.10


def batch_sizes(n: int, batch: int, first: int = 1) -> list[int]:
    """Units per network batch. A batch borrows several bits per dimension before it pays them
    back (see ``RAMP``), which must already be on the stack or be paid as initial bits; so batches
    start at ``first`` and grow as ⌊first·RAMP^i⌋ up to ``batch``: the initial bits are about those
    of the first batch."""
    sizes, done, size = [], 0, float(max(1, min(first, batch)))
    while done < n:
        s = min(int(size), n - done)
        sizes.append(s)
        done += s
        size = min(float(batch), size * RAMP)
    return sizes


def _spans(sizes: list[int]) -> list[tuple[int, int]]:
    ends = np.cumsum(sizes).tolist()
    return [(e - s, e) for s, e in zip(sizes, ends)]


def group_batches(groups: list[np.ndarray], batch: int, first: int = 1) -> tuple[list[int], list[tuple[int, int, int]]]:
    """Batch sizes for units in groups of one shape each, and their (group, first, end) spans.
    ``batch_sizes``'s ramp counted in values, not units: batch i holds at most ⌊first·RAMP^i⌋
    times the first unit's values (at least one unit, at most ``batch``, within one group), so a
    group of larger units after the ramp's quarters starts with one unit."""
    sizes, spans = [], []
    budget = float(max(1, min(first, batch)) * groups[0][0].size)
    top = float(batch * max(g[0].size for g in groups))
    for g, units in enumerate(groups):
        a = 0
        while a < len(units):
            n = min(batch, len(units) - a, max(1, int(budget // units[0].size)))
            sizes.append(n)
            spans.append((g, a, a + n))
            a += n
            budget = min(top, budget * RAMP)
    return sizes, spans


def group_spans(sizes: list[int], ends: list[int]) -> list[tuple[int, int, int]]:
    """(group, first, end) within the group of each batch; ValueError if one spans two groups."""
    starts = [0] + ends[:-1]
    out = []
    for a, b in _spans(sizes):
        g = int(np.searchsorted(ends, a, side="right"))
        if g >= len(ends) or b > ends[g]:
            raise ValueError("a batch crosses a group of units")
        out.append((g, a - starts[g], b - starts[g]))
    return out


def encode_lossless(
    images: list[tuple[str, np.ndarray]],
    model: LoadedModel,
    steps: int | None = DEFAULT_STEPS,
    var_type: VarianceType | None = None,
    grid_bits: int | None = None,
    batch: int = DEFAULT_BATCH,
    progress: Callable[[int], None] | None = None,
    first_batch: int = 1,
    spacing: str | None = None,
    tile: int | None = None,
    flips: str | None = None,
    coupling: bool | None = None,
    fit_variance: bool | None = None,
    spatial: bool | None = None,
    adapt: int = 0,
    adapt_precision: str = "fp32",
    adapt_progress: Callable[[int], None] | None = None,
) -> EncodeResult:
    """Encode named uint8 images [H, W, C] (C = the model's channels) into one .ddpm file.
    ``var_type`` None: the calibrated variance if the model has it, else β̃. ``spacing``: of the
    K steps (``LoadedModel.chain``; default optimal for a calibrated model). ``tile``: the units'
    side (default ``unit_size``'s; a size other than the model's writes format version 5).
    ``flips``: the network's flip ensemble (``diffusion.FlipEnsemble``; default the model's; one
    writes format version 8). ``coupling``: couple the colour channels (``ddpm_codec.coupling``:
    ρ measured on these images, stated in the header; format version 10, or 11 with a variance fit). None: for colour
    images of at least ``coupling.MIN_DIMS`` values with a calibrated or learned variance.
    ``fit_variance``: scale p's error variance per channel to fit these images (``varscale``,
    stated in the header; format version 11). None: for images of at least ``varscale.MIN_DIMS``
    values with a calibrated or learned variance. ``spatial``: code the decoder step's pixels in
    two checkerboard phases, the second given the first (``ddpm_codec.spatial``: weights fitted
    on these images, stated in the header; format version 12). None: as ``coupling``'s default.
    ``adapt``: fine-tune the network's biases and normalisations on these images for that many
    steps (``ddpm_codec.adapt``; ``adapt_precision`` its forward pass) and code the rounded
    changes in the file (format version 13); 0: the model as shipped."""
    t0 = time.perf_counter()
    flips = model.flips_or_default(flips)
    if var_type is None:
        var_type = model.default_variance()
    if grid_bits is None:
        grid_bits = DEFAULT_GRID_BITS
    C = model.channels
    for name, im in images:
        if im.ndim != 3 or im.shape[2] != C or im.dtype != np.uint8:
            raise ValueError(f"{name}: {im.shape[-1] if im.ndim == 3 else '?'}-channel image, the model takes {C}")
    shapes = [im.shape[:2] for _, im in images]
    size = unit_size(model, shapes, tile)
    layout = layout_for(model, shapes, size)
    groups = layout.cut([im for _, im in images])
    sched = model.chain(steps, spacing)
    adapted = widths = None
    adapt_s = 0.0
    if adapt:
        changes = adaptation.fit(model, [im for _, im in images], sched.K, adapt, precision=adapt_precision,
                                 progress=adapt_progress)
        adapted = adaptation.quantize(changes)
        widths = adaptation.std_codes(adapted)
        model = adaptation.apply(model, adapted)
        adapt_s = time.perf_counter() - t0
    timed = _TimedNet(model.network(flips))
    dims = sum(im.size for _, im in images)
    fit_of = varscale.assign([im.size for _, im in images])
    unit_fits = unit_tags(layout, shapes, fit_of)
    split_draws = [] if use_split(spatial, C, var_type, dims) else None
    stated, scaled = measure_file(timed, model, sched, var_type, groups, batch,
                                  use_coupling(coupling, C, var_type, dims), use_fit(fit_variance, var_type, dims),
                                  unit_fits=unit_fits, split_draws=split_draws)
    rho = None if stated is None else colour.table(stated, model.schedule.T)
    scale = None if scaled is None else varscale.tables(scaled, model.schedule.T, C)
    stated_split = None if split_draws is None else measure_split(model, var_type, split_draws, rho, scale)
    coder = ChainCoder(timed, sched, model.variance(sched, var_type), grid_bits, rho, scale, stated_split)
    threads = torch.get_num_threads()
    sizes, spans = group_batches(groups, batch, first_batch)
    n_values = sum(g.size for g in groups)
    # Seed words below the stack's lowest point are left out of the file, so a generous seed costs
    # nothing but memory; one that runs dry forces a second encode (measured: the batch ramp
    # borrowed ~0.5 bits/dim of 100 digits at K = 1000, far above one batch's 12 bits/dim).
    n_seed = min(1 << 24, n_values // 4 + 1024)  # 8 bits per dimension of the whole input
    while True:
        seeds = seed_words(n_seed)
        stack = Stack(seeds)
        start = stack.bits()
        lowest = [start]
        with torch_threads(threads):
            for g, a, b in spans:
                coder.encode(stack, groups[g][a:b], on_step=lambda s: lowest.append(s.bits()), fits=unit_fits[g][a:b])
                if progress:
                    progress(b - a)
        adapt_bits = stack.bits()
        if adapted is not None:  # on top: the decoder pops the network's changes first
            adaptation.push(stack, adapted, widths)
        adapt_bits = stack.bits() - adapt_bits
        if min(lowest) >= 64 + 2 * 32:  # the seed was never exhausted
            break
        n_seed *= 2
    # words below the lowest point were never read: leave them out (the decoder ends there)
    dropped = max(0, (min(lowest) - 64) // 32 - 1)
    payload = stack.words()[dropped:]
    header = {
        "mode": Mode.LOSSLESS.value,
        "encoder": f"ddpm-codec {__version__}",
        "model": model.model_id,
        "schedule": model.chain_spec(steps, spacing),
        "variance": var_type.value,
        "grid_bits": grid_bits,
        "batches": sizes,
        "threads": threads,
        "tile": size,
        **({"ramp": layout.ramp} if layout.ramp else {}),
        **({"flips": flips} if flips != "none" else {}),
        **({"coupling": stated} if stated is not None else {}),
        **({"var_scale": scaled} if scaled is not None else {}),
        **({"var_scale_of": fit_of} if scaled is not None and len(scaled) > 1 else {}),
        **({"spatial": stated_split} if stated_split is not None else {}),
        **({"adapt": {"grid": adaptation.GRID_BITS, "steps": int(adapt), "widths": widths}} if adapted is not None
           else {}),
        "channels": C,
        "names": pack_names([name for name, _ in images]),
        "shapes": [[int(im.shape[0]), int(im.shape[1])] for _, im in images],
        "seed_words": {"count": n_seed, "dropped": dropped},
        "pixels_sha256": pixels_digest([im for _, im in images]),
    }
    version = (LOSSLESS_ADAPTED_VERSION if adapted is not None else
               LOSSLESS_SPLIT_VERSION if stated_split is not None else
               LOSSLESS_SCALED_VERSION if scale is not None else LOSSLESS_COUPLED_VERSION if rho is not None else LOSSLESS_FLIPS_VERSION if flips != "none" else
               LOSSLESS_EVEN_VERSION if layout.even else
               LOSSLESS_VERSION if size == model.image_size else LOSSLESS_TILED_VERSION)
    data = Container(header, payload, version).to_bytes()
    return EncodeResult(data=data, dims=dims, initial_bits=32 * (n_seed - dropped),
                        seconds=time.perf_counter() - t0, net_seconds=timed.seconds,
                        header_bytes=len(data) - 4 * payload.size, variance=var_type.value,
                        adapt_seconds=adapt_s, adapt_bits=adapt_bits)


def couplable(channels: int, var_type: VarianceType) -> bool:
    """Colour coupling needs 3 channels and a variance that models the x̂_0 error."""
    return channels == 3 and var_type in (VarianceType.CALIBRATED, VarianceType.LEARNED)


def use_coupling(coupling: bool | None, channels: int, var_type: VarianceType, dims: int) -> bool:
    """Whether a lossless file couples its colour channels (``coupling``): ``coupling`` True or
    False, or None for the default — colour images of at least ``coupling.MIN_DIMS`` values;
    only a variance that models the x̂_0 error (calibrated or learned) can be coupled."""
    possible = couplable(channels, var_type)
    if coupling and not possible:
        raise ValueError("colour coupling needs 3-channel images and the calibrated or learned variance")
    return possible and (coupling if coupling is not None else dims >= colour.MIN_DIMS)


def fittable(var_type: VarianceType) -> bool:
    """A variance scale needs a variance that models the x̂_0 error."""
    return var_type in (VarianceType.CALIBRATED, VarianceType.LEARNED)


def use_fit(fit: bool | None, var_type: VarianceType, dims: int) -> bool:
    """Whether a lossless file fits its own variance scale (``varscale``): ``fit`` True or False,
    or None for the default — images of at least ``varscale.MIN_DIMS`` values; only a variance
    that models the x̂_0 error (calibrated or learned) can be scaled."""
    if fit and not fittable(var_type):
        raise ValueError("a variance scale needs the calibrated or learned variance")
    return fittable(var_type) and (fit if fit is not None else dims >= varscale.MIN_DIMS)


def use_split(spatial: bool | None, channels: int, var_type: VarianceType, dims: int) -> bool:
    """Whether a lossless file splits its decoder step like a checkerboard (``spatial``): ``spatial``
    True or False, or None for the default — as the colour coupling's (measured on photos only);
    the weights are fitted on a variance that models the x̂_0 error (calibrated or learned)."""
    if spatial and not fittable(var_type):
        raise ValueError("a checkerboard decoder needs the calibrated or learned variance")
    if spatial is not None:
        return bool(spatial)
    return use_coupling(None, channels, var_type, dims) and dims >= split.MIN_DIMS


def measure_split(model: LoadedModel, var_type: VarianceType, draws: list, rho: np.ndarray | None,
                  scale: np.ndarray | None) -> list[int]:
    """The checkerboard decoder's weights a file states (``spatial.estimate``), fitted on the t = 1
    draws ``measure_file`` kept (``split_draws``: no network calls of its own), with the decoder as
    the coder will run it: the file's variance fit (``scale``, indexed by each draw's tag; None:
    none) and colour coupling (``rho``)."""
    from .coupling import pair_correlations

    e = model.error_table(var_type)
    C = model.channels

    def decoder():
        for x0, err, es, tag in draws:
            var = e[1] * (es.double() if es is not None else torch.ones_like(err))
            if scale is not None:  # σ² = v·E + a at k = 1 (β̃_1 = 0, c_1 = 1)
                fits = scale[np.zeros(len(x0), dtype=np.int64) if tag is None else tag]
                fit = torch.from_numpy(fits[:, 1]).reshape(len(x0), 2 * C, 1, 1)
                var = var * fit[:, :C] + fit[:, C:]
            yield x0, x0 + err, var.sqrt()

    def conditional_of(mean, std):
        r = None if rho is None else pair_correlations(std * std, std * std,
                                                       tuple(torch.tensor(float(v)) for v in rho[1]))
        return split.channel_conditional(mean, std, r)

    return split.estimate(decoder(), C, conditional_of)


def unit_tags(layout: "UnitLayout", shapes: list[tuple[int, int]], per_image: list[int]) -> list[np.ndarray]:
    """``per_image``'s entry of each unit's image, per group of units (as ``layout.cut`` orders them)."""
    return [np.array([per_image[i] for i, _ in members], dtype=np.int64) for _, members in layout.groups(shapes)]


def measure_file(net, model: LoadedModel, sched, var_type: VarianceType, units: list[np.ndarray], batch: int,
                 rho: bool, scale: bool, progress: Callable[[int], None] | None = None,
                 unit_fits: list[np.ndarray] | None = None,
                 split_draws: list | None = None) -> tuple[list | None, list | None]:
    """What the encoder states about its own images, from one draw per unit at each anchor
    (``coupling.anchor_errors``): the colour coupling's ρ (of all units) if ``rho``; if ``scale``,
    the variance fits (for the chain ``sched``), one per index in ``unit_fits`` (each unit's
    fit, per group; None: one fit for all); each None when not asked for. ``split_draws``: a list
    to which the t = 1 draws (x_0, err, exp(s) or None, tag) of every few units (at most
    ``spatial.FIT_UNITS`` of them) are appended, for ``measure_split``."""
    if not (rho or scale or split_draws is not None):
        return None, None
    n_fits = 1 if unit_fits is None else 1 + max(int(f.max()) for f in unit_fits if len(f))
    rho_fit = colour.RhoFit() if rho else None
    fits = [varscale.Fit(model.error_table(var_type), sched, model.channels) for _ in range(n_fits)] if scale else []
    stride = max(1, -(-sum(len(u) for u in units) // split.FIT_UNITS))
    seen = 0  # units of the t = 1 draws so far
    for t, x0, err, es, tag in colour.anchor_errors(net, model.schedule, units, batch,
                                                     torch.Generator().manual_seed(0), progress, unit_fits):
        if split_draws is not None and t == 1:
            keep = torch.from_numpy((seen + np.arange(len(x0))) % stride == 0)
            seen += len(x0)
            split_draws.append((x0[keep], err[keep], None if es is None else es[keep],
                                None if tag is None else tag[keep.numpy()]))
        elif not (rho or scale):
            break  # only the split's draws were asked for
        if rho_fit is not None:
            rho_fit.add(t, x0, err, es)
        for j, f in enumerate(fits):
            sel = slice(None) if tag is None else torch.from_numpy(tag == j)
            if tag is None or bool(sel.any()):
                f.add(t, x0[sel], err[sel], None if es is None else es[sel])
    return (None if rho_fit is None else rho_fit.rows()), ([f.rows() for f in fits] if scale else None)


def header_steps(spec: dict, model: LoadedModel | None) -> list[int] | None:
    """The step subsequence a header names; None for optimal steps without the model to compute them."""
    if spec.get("spacing") == "optimal":
        return model.chain_from_spec(spec).steps if model is not None else None
    return schedule_from_spec(spec).steps


def info(data: bytes, model: LoadedModel | None = None) -> dict:
    c = Container.from_bytes(data)
    h = c.header
    images = [{"name": n, "height": s[0], "width": s[1]} for n, s in zip(unpack_names(h["names"]), h["shapes"])]
    model = model if model is not None and model.model_id == h["model"] else None
    return {"format_version": h["_version"], "mode": h["mode"], "model": h["model"], "images": images,
            "steps": header_steps(h["schedule"], model), "K": h["schedule"].get("K"),
            "spacing": h["schedule"].get("spacing", "listed"),
            "schedule": h["schedule"]["kind"], "T": h["schedule"]["T"],
            "variance": h["variance"], "grid_bits": h["grid_bits"], "tile": h["tile"], "ramp": h.get("ramp", 0),
            "flips": header_flips(h, LOSSLESS_FLIPS_VERSION), "coupling": header_coupling(h),
            "var_scale": _fits(h), "var_scale_of": _fits(h, 1),
            "spatial": header_spatial(h, int(h.get("channels", 1))), "adapt": header_adapt(h),
            "bytes": len(data),
            "payload_words": h["payload_words"], "initial_bits": 32 * (h["seed_words"]["count"] -
                                                                         h["seed_words"]["dropped"])}


def _fits(h: dict, part: int = 0):
    fits = header_var_scale(h, int(h.get("channels", 1)), len(h.get("shapes", [])))
    return None if fits is None else fits[part]


def decode(data: bytes, model: LoadedModel, progress: Callable[[int], None] | None = None) -> DecodeResult:
    """Decode a .ddpm file with ``model``; raises DecodeError unless every pixel comes back."""
    t0 = time.perf_counter()
    c = Container.from_bytes(data)
    h = c.header
    try:
        if h["mode"] != Mode.LOSSLESS.value:
            raise FormatError(f"mode {h['mode']!r} is not supported by this ddpm-codec")
        if h["model"] != model.model_id:
            raise DecodeError(f"the file was made with model {h['model']}, not {model.model_id}")
        size, C = int(h["tile"]), int(h["channels"])
        if C != model.channels:
            raise DecodeError("the file's tile shape does not fit the model")
        even = c.version in (LOSSLESS_EVEN_VERSION, LOSSLESS_FLIPS_VERSION, LOSSLESS_COUPLED_VERSION,
                             LOSSLESS_SCALED_VERSION, LOSSLESS_SPLIT_VERSION, LOSSLESS_ADAPTED_VERSION)
        flips = header_flips(h, LOSSLESS_FLIPS_VERSION)
        stated = header_coupling(h)
        rho = None if stated is None else colour.table(stated, model.schedule.T)
        scaled = header_var_scale(h, C, len(h["shapes"]))
        scale = None if scaled is None else varscale.tables(scaled[0], model.schedule.T, C)
        stated_split = header_spatial(h, C)
        stated_adapt = header_adapt(h)
        if stated_adapt is not None and stated_adapt["grid"] != adaptation.GRID_BITS:
            raise FormatError(f"header: adaptation grid 2^-{stated_adapt['grid']}, this reader knows "
                              f"2^-{adaptation.GRID_BITS}")
        if not even and (size != model.image_size) != (c.version == LOSSLESS_TILED_VERSION):
            raise FormatError(f"header: tile {size} in a version-{c.version} file")
        check_tile(size, model)
        sched = model.chain_from_spec(h["schedule"])
        var_type = VarianceType(h["variance"])
        if rho is not None and not couplable(C, var_type):
            raise FormatError(f"header: colour coupling with {C} channel(s) and the {var_type.value} variance")
        if scale is not None and not fittable(var_type):
            raise FormatError(f"header: a variance scale with the {var_type.value} variance")
        if stated_split is not None and not fittable(var_type):
            raise FormatError(f"header: a checkerboard decoder with the {var_type.value} variance")
        shapes = [(int(a), int(b)) for a, b in h["shapes"]]
        names = unpack_names(h["names"])
        if len(names) != len(shapes):
            raise FormatError("header: names and shapes differ in number")
        ramp = int(h.get("ramp", 0))
        if ramp and not even or not 0 <= ramp <= count_tiles(shapes[:1], size):
            raise FormatError(f"header: ramp {ramp} in a version-{c.version} file")
        layout = UnitLayout(size, tile_multiple(model.config), even, ramp)
        groups = layout.groups(shapes)
        ends = np.cumsum([len(m) for _, m in groups]).tolist()
        sizes = [int(v) for v in h["batches"]]
        if sum(sizes) != ends[-1] or min(sizes) < 1:
            raise FormatError("header: batch sizes do not add up to the units")
        spans = group_spans(sizes, ends)
        unit_fits = unit_tags(layout, shapes, scaled[1] if scaled is not None else [0] * len(shapes))
        seeds = seed_words(int(h["seed_words"]["count"]))
        dropped = int(h["seed_words"]["dropped"])
        threads = int(h["threads"])
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, (DecodeError, FormatError)):
            raise
        raise FormatError(f"malformed header ({type(e).__name__}: {e})") from None
    stack = Stack(c.payload)
    if stated_adapt is not None:
        sizes_of = [s.stop - s.start for _, s in adaptation.groups(model.net)]
        try:
            model = adaptation.apply(model, adaptation.pop(stack, sizes_of, stated_adapt["widths"]))
        except ValueError as e:
            raise DecodeError(f"the network's adaptation does not decode ({e})") from None
    try:
        coder = ChainCoder(model.network(flips), sched, model.variance(sched, var_type), int(h["grid_bits"]), rho,
                           scale, stated_split)
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"malformed header ({type(e).__name__}: {e})") from None
    units = [np.empty((len(m), C, a, b), dtype=np.uint8) for (a, b), m in groups]
    try:
        with torch_threads(threads):
            for g, a, b in reversed(spans):
                units[g][a:b] = coder.decode(stack, (b - a, *units[g].shape[1:]), unit_fits[g][a:b])
                if progress:
                    progress(b - a)
    except ValueError as e:
        raise DecodeError(f"the payload does not decode ({e})") from None
    if not np.array_equal(stack.words(), seeds[dropped:]):
        raise DecodeError("decoding did not end on the stream's initial words: the file is corrupt "
                          "or was decoded with different numerics than it was encoded with")
    images = list(zip(names, layout.paste(units, shapes, C)))
    if pixels_digest([im for _, im in images]) != h["pixels_sha256"]:
        raise DecodeError("decoded pixels do not match the original's checksum; nothing was written")
    dims = sum(im.size for _, im in images)
    return DecodeResult(images=images, bits_per_dim=8 * len(data) / dims, seconds=time.perf_counter() - t0)
