"""Per-file adaptation of the network (lossless format version 13).

A model trained on many photos is not the best model of any one of them. The encoder fine-tunes
a small part of the network — its biases, its normalisations' scales and shifts, and the weights
of its first and last convolutions: 6,038 of the `photos` model's 690,000 parameters — on random crops of the file's own images, with the
loss the model was trained with; rounds each change to a grid of 2^-``GRID_BITS``; and codes
the rounded changes on the file's stack, each parameter group under a quantized Gaussian of its
stated width. The decoder pops them first, adds them to the shipped weights (one float32 add of
an exact multiple of a power of two per parameter: the same on every machine) and decodes with
the adapted network. Decoding costs nothing extra; encoding costs the fine-tuning's steps.

Parameters left out because they change nothing the others cannot: a residual block's
time-projection bias (added to its first convolution's bias), its skip convolution's bias (added
to its second convolution's), and the key third of an attention block's qkv bias (q·b is the
same for every key, so the softmax does not see it).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Callable

import numpy as np
import torch

from .checkpoint import LoadedModel
from .coding.entropy import MAX_RANGE, Stack
from .data import CropSource, to_model_space

GRID_BITS = 6  # changes rounded to multiples of 1/64 (measured: /64 and /128 cost the bound 0.0015 and less)
STD_STEPS = 4  # a group's stated width: 2^(code / 4) grid units
MIN_STD_CODE = -8  # 0.25 grid units
MAX_STD_CODE = 64  # 2^16 grid units
CROP = 32  # fine-tuning crops (the size the shipped models were trained on)
DEFAULT_LR = 1e-3
DEFAULT_BATCH = 64


class AdaptError(ValueError):
    """Images or a model the adaptation cannot use; the message is one line."""


def groups(net: torch.nn.Module) -> list[tuple[str, slice]]:
    """The adapted parameters, in a fixed order: (parameter name, slice of its flat values)."""
    out = []
    for name, p in net.named_parameters():
        leaf = name.rsplit(".", 1)
        if len(leaf) < 2:
            continue
        owner, kind = leaf
        is_norm = owner.rsplit(".", 1)[-1].startswith("norm")
        if kind != "bias" and not is_norm and owner not in ("conv_in", "conv_out"):
            continue
        if kind == "bias" and "." in owner and owner.rsplit(".", 1)[-1] in ("temb", "skip"):
            continue  # block-level time projection and skip: their biases add to a convolution's
        if owner.endswith(".qkv"):
            c = p.numel() // 3
            out += [(name, slice(0, c)), (name, slice(2 * c, 3 * c))]  # q and v; k's bias is invisible
            continue
        out.append((name, slice(0, p.numel())))
    return out


def count(net: torch.nn.Module) -> int:
    return sum(s.stop - s.start for _, s in groups(net))


def fit(model: LoadedModel, images: list[np.ndarray], K: int, steps: int, lr: float = DEFAULT_LR,
        batch: int = DEFAULT_BATCH, seed: int = 0, precision: str = "fp32",
        progress: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """Fine-tune the adapted parameters of ``model``'s network on random ``CROP``² crops of
    ``images`` (uint8 [H, W, C]) for ``steps`` Adam steps (lr warm-up over the first 20, gradient
    clipping at 1, EMA 0.999 as in training) with the model's training loss: bound-sampled t for a
    ``K``-step chain and, for a model that learns its variance, the hybrid loss. Returns the EMA
    weights' changes, one float64 array per group of ``groups``."""
    from .diffusion import BoundSampling, VarianceLoss, l_simple
    from .likelihood import decoder_error_slope
    from .train import BF16Forward, PRECISIONS

    if precision not in PRECISIONS:
        raise AdaptError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if model.x0_mse is None:
        raise AdaptError(f"model {model.model_id} has no calibration: adaptation trains for the coded chain")
    crop = min(CROP, *(min(im.shape[:2]) for im in images))
    crop -= crop % 4
    if crop < 8:
        raise AdaptError("adaptation needs images of at least 8×8")
    sched = model.schedule
    net = copy.deepcopy(model.net).float()
    gs = groups(net)
    params = dict(net.named_parameters())
    for p in net.parameters():
        p.requires_grad_(False)
    for name, _ in gs:
        params[name].requires_grad_(True)
    masks = {}  # parameters adapted only in part: the rest's gradient is zeroed
    for name, sl in gs:
        m = masks.setdefault(name, torch.zeros(params[name].numel()))
        m[sl] = 1.0
    masks = {k: m.view_as(params[k]) for k, m in masks.items() if not bool(m.all())}
    ema = copy.deepcopy(net)
    trained = [params[n] for n in dict.fromkeys(n for n, _ in gs)]
    ema_params = dict(ema.named_parameters())
    ema_trained = [ema_params[n] for n in dict.fromkeys(n for n, _ in gs)]
    source = CropSource("file", list(images), crop)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    e = np.asarray(model.x0_mse, dtype=np.float64)
    x_cal = to_model_space(source.sample(np.random.default_rng(seed + 1), 256))
    slope = decoder_error_slope(net, sched, x_cal, torch.Generator().manual_seed(seed + 1), e)
    t_sampling = BoundSampling.build(sched, e, K, slope)
    variance_loss = None
    if model.config.learn_sigma:
        base = np.asarray(model.var_base if model.var_base is not None else e, dtype=np.float64)
        variance_loss = VarianceLoss.build(sched, base, t_sampling.steps)
    opt = torch.optim.Adam(trained, lr=lr)
    forward = BF16Forward(net) if precision == "bf16" else net
    net.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 20)
        x0 = to_model_space(source.sample(rng, batch))
        loss = l_simple(forward, sched, x0, gen, t_sampling, variance_loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"adaptation's loss became {loss.item()} at step {step}")
        for name, m in masks.items():
            params[name].grad.mul_(m)
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(0.999, (2 + step) / (11 + step))
            torch._foreach_mul_(ema_trained, decay)
            torch._foreach_add_(ema_trained, trained, alpha=1.0 - decay)
        if progress:
            progress(1)
    base_params = dict(model.net.named_parameters())
    return [(ema_params[n].detach().flatten()[sl].double() - base_params[n].detach().flatten()[sl].double()).numpy()
            for n, sl in gs]


def quantize(changes: list[np.ndarray]) -> list[np.ndarray]:
    """Changes rounded to the grid 2^-GRID_BITS: integers, one int64 array per group."""
    return [np.rint(np.asarray(c, dtype=np.float64) * 2.0 ** GRID_BITS).astype(np.int64) for c in changes]


def apply(model: LoadedModel, ints: list[np.ndarray]) -> LoadedModel:
    """``model`` with its network's adapted parameters moved by ``ints`` grid steps (exact in
    float32: an integer times a power of two, then one add). Same model id: the file names the
    shipped model and carries the changes."""
    net = copy.deepcopy(model.net)
    gs = groups(net)
    if len(ints) != len(gs) or any(len(d) != s.stop - s.start for d, (_, s) in zip(ints, gs)):
        raise AdaptError("the adaptation does not fit this model's network")
    params = dict(net.named_parameters())
    with torch.no_grad():
        for (name, sl), d in zip(gs, ints):
            flat = params[name].view(-1)
            step = torch.from_numpy(np.asarray(d, dtype=np.float32)) * np.float32(2.0 ** -GRID_BITS)
            flat[sl] = flat[sl] + step
    net.eval()
    return dataclasses.replace(model, net=net)


def std_codes(ints: list[np.ndarray]) -> list[int]:
    """Each group's stated width: the code of 2^(code / STD_STEPS) nearest its RMS (grid units)."""
    out = []
    for d in ints:
        rms = math.sqrt(float(np.mean(np.square(d.astype(np.float64))))) if d.size else 0.0
        code = MIN_STD_CODE if rms <= 0 else round(STD_STEPS * math.log2(rms))
        out.append(int(min(MAX_STD_CODE, max(MIN_STD_CODE, code))))
    return out


def _std_range(code: int) -> tuple[float, int]:
    if not MIN_STD_CODE <= code <= MAX_STD_CODE:
        raise AdaptError(f"an adaptation width code {code} outside {MIN_STD_CODE}..{MAX_STD_CODE}")
    std = 2.0 ** (code / STD_STEPS)
    return std, int(min(MAX_RANGE, max(1, math.ceil(8 * std))))


def push(stack: Stack, ints: list[np.ndarray], codes: list[int]) -> None:
    """Push the groups' integers (the last group first, so ``pop`` returns them in order)."""
    for d, code in reversed(list(zip(ints, codes))):
        std, R = _std_range(code)
        stack.push_gaussian(d, np.zeros(d.shape), std, R)


def pop(stack: Stack, sizes: list[int], codes: list[int]) -> list[np.ndarray]:
    if len(sizes) != len(codes):
        raise AdaptError("the adaptation's widths do not match the network's groups")
    out = []
    for n, code in zip(sizes, codes):
        std, R = _std_range(code)
        out.append(stack.pop_gaussian(np.zeros(n), std, R))
    return out
