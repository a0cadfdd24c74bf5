"""Codec benchmark (not a test): coded rate against the bound of the same chain, and time."""
from __future__ import annotations

import contextlib
import time
from typing import Callable

import numpy as np
import torch

from ddpm_codec.checkpoint import LoadedModel
from ddpm_codec.codec import decode, encode_lossless, group_batches, info, layout_for, unit_size
from ddpm_codec import varscale
from ddpm_codec.coupling import table
from ddpm_codec.data import to_model_space
from ddpm_codec.diffusion import VarianceType
from ddpm_codec.likelihood import bound_full


class _NoBar(contextlib.nullcontext):
    def update(self, n: int = 1) -> None:
        pass


def _no_bar(desc: str, total: int) -> _NoBar:
    return _NoBar()


def network_only_seconds(model: LoadedModel, groups: list[np.ndarray], K: int, batch: int,
                         progress: Callable[[int], None] | None = None, flips: str | None = None) -> float:
    """The network alone over the same batches (``groups``: the file's units, by shape) and steps
    the coder runs (random inputs)."""
    gen = torch.Generator().manual_seed(0)
    _, spans = group_batches(groups, batch)
    net = model.network(flips)
    t0 = time.perf_counter()
    with torch.no_grad():
        for g, a, b in spans:
            x = torch.randn((b - a, *groups[g].shape[1:]), generator=gen)
            for k in range(K, 0, -1):
                net(x, torch.full((x.shape[0],), float(k)))
            if progress:
                progress(b - a)
    return time.perf_counter() - t0


def bench_images(model: LoadedModel, images: list[tuple[str, np.ndarray]], K: int,
                 var_type: VarianceType | None, grid_bits: int, batch: int, with_bound: bool = True,
                 spacing: str | None = None, bar: Callable = _no_bar, network_alone: bool = True,
                 tile: int | None = None, flips: str | None = None, coupling: bool | None = None,
                 fit_variance: bool | None = None, spatial: bool | None = None, adapt: int = 0,
                 adapt_precision: str = "fp32") -> dict:
    """``bar(desc, total)``: a progress bar (a context manager with ``update(n)``) for each phase,
    counted in tiles. ``network_alone=False`` skips timing the network by itself (a third of the
    run's time); its keys are then None. ``tile``, ``flips``, ``coupling``, ``fit_variance``, ``spatial``,
    ``adapt``, ``adapt_precision``: as ``encode_lossless``'s (the network alone and the bound are timed
    and measured with the network as shipped)."""
    flips = model.flips_or_default(flips)
    shapes = [im.shape[:2] for _, im in images]
    tile = unit_size(model, shapes, tile)
    groups = layout_for(model, shapes, tile).cut([im for _, im in images])
    n_units = sum(len(g) for g in groups)
    with bar("encode", n_units) as pb:
        res = encode_lossless(images, model, K, var_type, grid_bits, batch, spacing=spacing, progress=pb.update,
                              tile=tile, flips=flips, coupling=coupling,
                              fit_variance=fit_variance, spatial=spatial, adapt=adapt,
                              adapt_precision=adapt_precision)
    t0 = time.perf_counter()
    with bar("decode", n_units) as pb:
        dec = decode(res.data, model, progress=pb.update)
    dec_s = time.perf_counter() - t0
    exact = all(np.array_equal(a, b) for (_, a), (_, b) in zip(images, dec.images))
    net_only = None
    if network_alone:
        with bar("network alone", n_units) as pb:
            net_only = network_only_seconds(model, groups, K, batch, pb.update, flips)
    payload_bits = 8 * (len(res.data) - res.header_bytes) - res.initial_bits
    about = info(res.data)
    stated, scaled, scaled_of = about["coupling"], about["var_scale"], about["var_scale_of"]
    out = {
        "images": len(images), "dims": res.dims, "steps": K, "tile": tile, "flips": flips,
        "coupling": stated, "var_scale": scaled, "var_scale_of": scaled_of, "spatial": about["spatial"], "variance": res.variance, "grid_bits": grid_bits,
        "spacing": spacing or ("optimal" if model.x0_mse is not None else "even"),
        "batch": batch, "bytes": len(res.data), "bits_per_dim": res.bits_per_dim,
        "initial_bits": res.initial_bits, "initial_bits_per_dim": res.initial_bits / res.dims,
        "header_bytes": res.header_bytes, "net_bits_per_dim": payload_bits / res.dims, "exact": exact,
        "encode_s": res.seconds, "encode_network_s": res.net_seconds, "encode_coder_s": res.seconds - res.net_seconds,
        "adapt_steps": adapt, "adapt_s": res.adapt_seconds, "adapt_bits_per_dim": res.adapt_bits / res.dims,
        "decode_s": dec_s, "network_only_s": net_only, "encode_over_network_only": res.seconds / net_only if net_only else None,
    }
    from .baselines import lossless_one_image, lossless_table

    out["classic_one_file_per_image"] = lossless_table([im for _, im in images])
    if len(images) > 1:
        out["classic_all_in_one_image"] = lossless_one_image([im for _, im in images])
    if with_bound and not adapt and all(im.shape[:2] == (model.image_size, model.image_size) for _, im in images):
        sched = model.chain(K, spacing)
        x0 = to_model_space(np.stack([im for _, im in images]))
        var_type = VarianceType(res.variance)
        # the bound with the file's own ρ and variance scale
        var, rho = model.variance(sched, var_type), None if stated is None else table(stated, model.schedule.T)
        scale = None if scaled is None else varscale.tables(scaled, model.schedule.T, model.channels)[scaled_of]
        net = model.network(flips)
        with torch.no_grad():
            b = torch.cat([bound_full(net, sched, x0[i:i + batch], torch.Generator().manual_seed(i), var,
                                      coupling=rho, scale=None if scale is None else scale[i:i + batch],
                                      spatial=about["spatial"]).total
                           for i in range(0, len(x0), batch)])
        out["bound_bits_per_dim"] = float(b.mean())
        out["net_over_bound"] = out["net_bits_per_dim"] / out["bound_bits_per_dim"]
        out["coded_over_bound"] = out["bits_per_dim"] / out["bound_bits_per_dim"]
    return out
