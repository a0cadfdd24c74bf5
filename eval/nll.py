"""Bits/dim of a set of images through the variational bound, batched, with progress."""
from __future__ import annotations

import enum
import math
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from ddpm_codec.checkpoint import LoadedModel
from ddpm_codec import coupling as colour
from ddpm_codec.data import to_model_space
from ddpm_codec.diffusion import VarianceType
from ddpm_codec.likelihood import bound_full, bound_mc
from ddpm_codec.schedule import Schedule


class BoundMethod(enum.Enum):
    FULL = "full"  # every term of the K-step chain: K network calls per image
    MC = "mc"  # unbiased estimate with random steps: `samples` network calls per image


@dataclass
class NllResult:
    bits_per_dim: float
    terms: dict  # prior (L_T), diffusion (Σ L_{k−1}), decoder (L_0); bits/dim, means over images
    stderr: float  # standard error of the mean over images (bits/dim)
    n: int
    steps: int  # K of the chain
    method: str
    variance: str
    model: str
    seconds: float
    flips: str = "none"
    coupling: list | None = None  # the ρ stated for the coupled colour channels (``coupling.estimate``), if coupled
    var_scale: list | None = None  # the variance fit of these images, as a list of one (``varscale``), if fitted
    spatial: list | None = None  # the checkerboard decoder's stated weights (``spatial``), if split

    def to_json(self) -> dict:
        return asdict(self)


def dataset_nll(
    model: LoadedModel,
    images: np.ndarray,
    sched: Schedule,
    gen: torch.Generator,
    method: BoundMethod = BoundMethod.FULL,
    var_type: VarianceType = VarianceType.FIXED_SMALL,
    batch: int = 250,
    samples: int = 1,
    progress: bool = True,
    flips: str | None = None,
    coupling: bool | None = None,
    fit_variance: bool | None = None,
    spatial: bool | None = None,
) -> NllResult:
    """The bound of the K-step chain ``sched`` on uint8 images [N, H, W, C], in bits/dim. H = W is
    the model's image size or another tile size it takes (``codec.check_tile``: the network is
    fully convolutional). ``flips``: the network's flip ensemble (default the model's).
    ``coupling``: couple the colour channels with ρ measured on these images, as the encoder
    does (``codec.use_coupling``; None: as the encoder's default). ``fit_variance``: refit the
    error variance to these images, as the encoder does (``codec.use_fit``) — but one fit for
    all the images, where the encoder fits each image of at least ``varscale.MIN_DIMS`` values
    apart. ``spatial``: split the decoder like a checkerboard, weights fitted on these images, as
    the encoder does (``codec.use_split``)."""
    from ddpm_codec import varscale
    from ddpm_codec.codec import measure_file, measure_split, use_coupling, use_fit, use_split

    from ddpm_codec.checkpoint import takes_tile

    h, w, c = images.shape[1:]
    if h != w or c != model.channels or (h != model.image_size and not takes_tile(h, model.config)):
        raise ValueError(f"images are {h}×{w}×{c} but the model takes "
                         f"{model.image_size}×{model.image_size}×{model.channels}")
    variance = model.variance(sched, var_type)
    net = model.network(flips)
    split_draws = [] if use_split(spatial, c, var_type, images.size) else None
    stated, scaled = measure_file(net, model, sched, var_type, [images.transpose(0, 3, 1, 2)], batch,
                                  use_coupling(coupling, c, var_type, images.size),
                                  use_fit(fit_variance, var_type, images.size), split_draws=split_draws)
    rho = None if stated is None else colour.table(stated, model.schedule.T)
    scale = None if scaled is None else varscale.tables(scaled, model.schedule.T, c)[0]  # one fit for all
    stated_split = (None if split_draws is None else
                    measure_split(model, var_type, split_draws, rho, None if scale is None else scale[None]))
    n = len(images)
    per_image = sched.K if method is BoundMethod.FULL else samples
    bar = tqdm(total=n * per_image, disable=not progress, file=sys.stderr, unit="img·step",
               unit_scale=True, dynamic_ncols=True)
    parts = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, n, batch):
            x0 = to_model_space(images[i:i + batch]).contiguous(memory_format=torch.channels_last)
            if method is BoundMethod.FULL:
                terms = bound_full(net, sched, x0, gen, variance, progress=bar.update, coupling=rho,
                                   scale=scale, spatial=stated_split)
            else:
                terms = bound_mc(net, sched, x0, gen, samples, variance, progress=bar.update, coupling=rho,
                                 scale=scale, spatial=stated_split)
            parts.append(torch.stack([terms.prior, terms.diffusion, terms.decoder], 1))
    bar.close()
    t = torch.cat(parts)  # [N, 3] bits/dim
    total = t.sum(1)
    mean = t.mean(0).tolist()
    return NllResult(
        bits_per_dim=float(total.mean()),
        terms={"prior": mean[0], "diffusion": mean[1], "decoder": mean[2]},
        stderr=float(total.std() / math.sqrt(n)) if n > 1 else float("nan"),
        n=n, steps=sched.K, method=method.value, variance=var_type.value, model=model.model_id,
        seconds=time.perf_counter() - t0, flips=model.flips_or_default(flips),
        coupling=stated, var_scale=scaled, spatial=stated_split,
    )
