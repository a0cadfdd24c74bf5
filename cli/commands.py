"""Subcommands of `ddpm-codec` (thin: parse, call the library, print)."""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import click
import numpy as np

from .main import InputError, cli, emit_json, user_errors

SOURCES_HELP = ("mnist[:train|valid|test], fashion-mnist[:train|test], cifar10:PATH[:train|test], "
                "photos[:train|heldout|all] (scikit-image's photos), wallpapers[:train|heldout|all] (Debian's "
                "plasma-workspace-wallpapers photographs, reduced 4×), wallpapers2x[:train|heldout|all] (the same, "
                "reduced 2×), mate[:train|all] (Debian's mate-backgrounds nature photographs, reduced 2×), photo "
                "sources joined with + (photos+wallpapers2x+mate:train), or a folder of images")


@cli.command()
@click.option("--data", required=True, help=f"Training data: {SOURCES_HELP}.")
@click.option("--size", type=click.Choice(["S", "M", "L"]), default="S", show_default=True,
              help="Network preset: S ≈ 0.7M, M ≈ 2.2M, L ≈ 8.9M parameters.")
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Training-time budget in minutes (summed over resumed runs).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Step budget (summed over resumed runs).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Checkpoint file; if it exists, training resumes from it.")
@click.option("--schedule", type=click.Choice(["linear", "cosine"]), default="linear", show_default=True)
@click.option("--T", "T", type=click.IntRange(min=2), default=1000, show_default=True, help="Diffusion steps.")
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--lr", type=float, default=5e-4, show_default=True)
@click.option("--ema", type=click.FloatRange(0, 1), default=0.999, show_default=True, help="EMA decay.")
@click.option("--dropout", type=float, default=0.0, show_default=True)
@click.option("--crop", type=int, default=32, show_default=True, help="Crop size for photo sources.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--checkpoint-every", type=float, default=3.0, show_default=True, help="Minutes between checkpoints.")
@click.option("--init", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Start from this checkpoint's EMA weights (same --size/--schedule/--T) with a fresh optimiser "
                   "and clock, e.g. fine-tune the MNIST model on Fashion-MNIST. Ignored when resuming.")
@click.option("--t-sampling", type=click.Choice(["uniform", "bound"]), default="uniform", show_default=True,
              help="uniform: L_simple. bound: draw t from the K-step chain the codec runs, in proportion to "
                   "each step's share of the bound's gradient, and weight by the step's calibrated error "
                   "(an unbiased estimate of the bound's gradient, linearised at the calibration); needs a "
                   "calibrated --init. See diffusion.BoundSampling.")
@click.option("--bound-steps", type=click.IntRange(min=2), default=100, show_default=True,
              help="K of the chain --t-sampling bound trains for (the codec's --steps).")
@click.option("--learn-variance", is_flag=True,
              help="Learn each pixel's reverse variance: a second output s (σ² = β̃ + c² e(t)·exp(s), "
                   "zero at the start, so the --init model's calibrated variance), trained with the hybrid "
                   "loss of improved DDPM: the ε loss plus λ × the chain's bound with the mean held fixed. "
                   "Needs --t-sampling bound and a calibrated --init (a model without s is widened). "
                   "The codec then uses --variance learned by default.")
@click.option("--vlb-weight", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="λ of --learn-variance's hybrid loss.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="bf16: run the network's forward pass under bfloat16 autocast while training (weights, "
                   "loss, optimiser and EMA stay fp32; the codec always runs fp32). Measured here on an "
                   "AMD EPYC with AVX-512 BF16, S preset, batch 64, 2 threads: 4.6–4.7 steps/s against "
                   "2.7–3.1 in fp32; yet 20 minutes of each at lr 1e-4 from the same `photos` run gave the same "
                   "bound (the photos card). On a CPU without bf16 units it is several times slower: measure "
                   "first. May differ between resumed runs.")
@click.option("--calibrate/--no-calibrate", default=True, show_default=True,
              help="At the end, measure the x̂_0 error per step on 64 training images (see `calibrate`).")
@user_errors
def train(data, size, minutes, steps, out, schedule, T, batch, lr, ema, dropout, crop, seed, checkpoint_every,
          init, t_sampling, bound_steps, learn_variance, vlb_weight, precision, calibrate):
    """Train an ε-network with L_simple (Algorithm 1).

    Adam with warm-up, EMA of the weights, gradient clipping. A checkpoint is
    written every few minutes and at the end; running the same command again
    resumes from it. Example:

      ddpm-codec train --data mnist --size S --minutes 20 --out runs/mnist-S.pt
    """
    from ddpm_codec.data import load_source
    from ddpm_codec.nets.unet import preset_config
    from ddpm_codec.schedule import ScheduleKind, make_schedule
    from ddpm_codec.train import TrainConfig, train as run

    if minutes is None and steps is None:
        raise InputError("give a budget: --minutes N or --steps N")
    source = load_source(data, "train", crop=crop)
    net_cfg = preset_config(size, source.channels, source.image_size, dropout)
    sched = make_schedule(ScheduleKind(schedule), T)
    cfg = TrainConfig(data=data, batch_size=batch, lr=lr, ema_decay=ema, seed=seed, minutes=minutes,
                      steps=steps, checkpoint_every_s=checkpoint_every * 60,
                      init=str(init) if init is not None else None, t_sampling=t_sampling,
                      bound_steps=bound_steps, learn_variance=learn_variance, vlb_weight=vlb_weight,
                      precision=precision)
    meta = run(cfg, net_cfg, sched, source, out)
    click.echo(f"trained {meta['step']} steps in {meta['elapsed_s'] / 60:.1f} min -> {out}", err=True)
    if calibrate:
        _calibrate(out, source, 64, seed)


def _calibrate(path: Path, source, n: int, seed: int) -> None:
    import torch
    from tqdm import tqdm

    from ddpm_codec import checkpoint

    rng = np.random.default_rng(seed + 1)
    images = source.take(n, rng) if not hasattr(source, "images") else source.images[
        rng.choice(len(source.images), min(n, len(source.images)), replace=False)]
    T = checkpoint.load(path).schedule.T
    with tqdm(total=T * len(images), file=sys.stderr, unit="img·step", unit_scale=True, desc="calibrate") as bar:
        new = checkpoint.calibrate(path, images, torch.Generator().manual_seed(seed), source.name,
                                   progress=bar.update)
    click.echo(f"calibrated {path} on {len(images)} images of {source.name}; model id {new.model_id}", err=True)


@cli.command()
@click.argument("checkpoint_path", metavar="CKPT", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--data", required=True, help="Training data to measure on (never the evaluation set).")
@click.option("--n", type=click.IntRange(min=1), default=64, show_default=True, help="Images per step.")
@click.option("--seed", type=int, default=0, show_default=True)
@user_errors
def calibrate(checkpoint_path, data, n, seed):
    """Measure the model's x̂_0 error at every step and store it in CKPT.

    Enables `--variance calibrated`: σ_t² = β̃_t + c_t² e(t), the isotropic
    optimum of Analytic-DPM, which tightens the bound and lets the bits-back
    coder reach it. Costs T network calls on a batch of N images.
    """
    from ddpm_codec import checkpoint
    from ddpm_codec.data import load_source

    lm = checkpoint.load(checkpoint_path)
    _calibrate(checkpoint_path, load_source(data, "train", crop=lm.image_size, channels=lm.channels), n, seed)


def _is_image_path(s: str) -> bool:
    from ddpm_codec.data import IMAGE_SUFFIXES

    p = Path(s)
    return p.is_file() or p.suffix.lower() in IMAGE_SUFFIXES


def _check_writable(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise InputError(f"{out} exists; pass --force to overwrite")
    if not out.parent.exists():
        raise InputError(f"{out.parent} does not exist")


def flips_option():
    """--flips: the network as a flip ensemble (``diffusion.FlipEnsemble``)."""
    return click.option(
        "--flips", type=click.Choice(["none", "h", "hv"]), default=None,
        help="Run the network as a flip ensemble: its outputs averaged over the input and its left–right "
             "mirror (h: 2× the network's time) or all four flips (hv: 4×). On photos it lowers every term of "
             "the bound (−0.02 bits/dim with h, −0.04 with hv on held-out crops); on digits, never mirrored in "
             "training, it does not. Default: the model's (`photos`: h; the grey models: none). Files that use "
             "it are format version 8 (lossless; 10 with coupled colours, 11 with a fitted variance) or 9 (lossy).")


def adapt_options(fn):
    """--adapt STEPS and --adapt-precision: the network fine-tuned to the file (``ddpm_codec.adapt``)."""
    fn = click.option(
        "--adapt-precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
        help="The fine-tuning's forward pass, as train --precision (bf16: about 1.5× the steps per second on a "
             "CPU with bf16 units, several times slower without). The file is the same kind either way; "
             "decoding never fine-tunes.")(fn)
    return click.option(
        "--adapt", type=click.IntRange(min=0), default=0, show_default=True, metavar="STEPS",
        help="Fine-tune part of the network (its biases, normalisations and first and last convolutions: "
             "6,038 of the photos model's 690,000 parameters) on random 32×32 crops of the images being coded for STEPS Adam steps, and code their "
             "rounded changes in the file (format version 13): the decoder applies them and does not "
             "fine-tune. Measured with photos, 2,000 steps, bf16, 1 thread: 0.36 s a step (12 min), the changes "
             "≈ 4.1 bits per parameter (0.016 bits/dim of two 640×400 images), and the held-out pairs 0.066–0.068 "
             "bits/dim smaller (the photos card). So it pays on large images, at several times the encode time. "
             "0: the model as shipped. Bits-back files only.")(fn)


def _tile_option(tile: int | None, lm) -> int:
    """--tile checked against the model (one line on error); None: the model's image size."""
    from ddpm_codec.codec import check_tile

    if tile is None:
        return lm.image_size
    try:
        return check_tile(tile, lm)
    except ValueError as e:
        raise InputError(f"--{e}") from None


def _check_coupling(coupling: bool | None, lm, variance: str | None) -> None:
    """--coupling where it cannot apply: one line, not a traceback."""
    from ddpm_codec.codec import use_coupling
    from ddpm_codec.diffusion import VarianceType

    if coupling:
        try:
            use_coupling(True, lm.channels, VarianceType(variance) if variance else lm.default_variance(), 0)
        except ValueError as e:
            raise InputError(f"--coupling: {e}") from None


def _check_fit(fit: bool | None, lm, variance: str | None) -> None:
    """--fit-variance where it cannot apply: one line, not a traceback."""
    from ddpm_codec.codec import use_fit
    from ddpm_codec.diffusion import VarianceType

    if fit:
        try:
            use_fit(True, VarianceType(variance) if variance else lm.default_variance(), 0)
        except ValueError as e:
            raise InputError(f"--fit-variance: {e}") from None


def _describe_fit(fits: list) -> str:
    """A file's variance fits at t = 1, for ``info``."""
    def one(row):
        C = len(row) // 2
        return ("scale " + ", ".join(f"{v / 256:.3f}" for v in row[:C])
                + "; floor " + ", ".join(f"{a / 256:.2f}" for a in row[C:]) + " levels²")
    return ("variance fitted (at t = 1: " + " | ".join(one(f[0]) for f in fits)
            + (f"; {len(fits)} fits, one per large image" if len(fits) > 1 else "") + "), ")


def _describe_split(stated: list) -> str:
    """A file's checkerboard decoder, for ``info``."""
    C = len(stated) // 2
    return ("checkerboard decoder (weight " + ", ".join(f"{v / 256:.3f}" for v in stated[:C])
            + "; variance × " + ", ".join(f"{v / 256:.3f}" for v in stated[C:]) + "), ")


def fit_variance_option():
    """--fit-variance/--no-fit-variance: the file's own variance scale (``ddpm_codec.varscale``)."""
    return click.option(
        "--fit-variance/--no-fit-variance", "fit_variance", default=None,
        help="Refit each reverse step's x̂_0-error variance per channel to the images being coded, a scale "
             "and an additive floor: the encoder fits both at t = 1, 2, 4 … 64 on the same draws as --coupling "
             "(no extra network calls) and states them in the header (format version 11). Helps images unlike the "
             "model's training data (held-out photo crops' bound 3.816 → 3.747). Default: on for files of at "
             "least 49,152 values with the calibrated or learned variance; bits-back files only.")


def _check_split(spatial: bool | None, lm, variance: str | None) -> None:
    """--spatial where it cannot apply: one line, not a traceback."""
    from ddpm_codec.codec import fittable
    from ddpm_codec.diffusion import VarianceType

    if spatial and not fittable(VarianceType(variance) if variance else lm.default_variance()):
        raise InputError("--spatial: a checkerboard decoder needs the calibrated or learned variance")


def spatial_option():
    """--spatial/--no-spatial: the checkerboard decoder (``ddpm_codec.spatial``)."""
    return click.option(
        "--spatial/--no-spatial", default=None,
        help="Code the last step (x_0 given x_1) in two checkerboard phases: each pixel of the second given "
             "how far its four neighbours of the first fell from the network's prediction, with a weight and a "
             "variance factor per channel that the encoder fits on the images being coded (on the t = 1 draws "
             "of --coupling and --fit-variance: no extra network calls) and states in the header (format version 12). Default: as --coupling's (colour "
             "images of at least 49,152 values); bits-back files only.")


def coupling_option():
    """--coupling/--no-coupling: colour coupling (``ddpm_codec.coupling``)."""
    return click.option(
        "--coupling/--no-coupling", default=None,
        help="Couple the colour channels of each reverse step: R coded first, G given R, B given both, with the "
             "correlations of the network's x̂_0 errors between channels, measured on the images being coded "
             "(7 extra network calls per unit) and stated in the header. −0.03 bits/dim on held-out photo "
             "crops. Default: on for colour images of at least 49,152 values (the size where bits-back starts), "
             "with the calibrated or learned variance. Bits-back files that use it are format version 10 (11 with "
             "--fit-variance, 12 with --spatial); the "
             "lossy path codes the channels apart.")


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--model", default=None, help="Shipped model name or checkpoint path (default: by channels).")
@click.option("--steps", "K", type=click.IntRange(min=1), default=None,
              help="Evaluate the K-step respaced chain (default: all T steps).")
@click.option("--n", type=click.IntRange(min=1), default=None, help="Use the first N images of a source.")
@click.option("--method", type=click.Choice(["full", "mc"]), default="full", show_default=True,
              help="full: every term (K network calls per image); mc: unbiased estimate with random steps.")
@click.option("--samples", type=click.IntRange(min=1), default=1, show_default=True,
              help="Random steps per image for --method mc.")
@click.option("--variance", type=click.Choice(["beta", "beta_tilde", "calibrated", "learned"]), default=None,
              help="Reverse-process variance σ²: β, β̃, learned per pixel (a model trained with "
                   "--learn-variance; its default), or calibrated from the model's measured x̂_0 error "
              "(`ddpm-codec calibrate`). Default: learned if the model learns it, else calibrated if the "
              "model has it (as `encode`), else β̃.")
@click.option("--spacing", type=click.Choice(["optimal", "even"]), default=None,
              help="Which K steps: optimal (least expected bound, from the model's calibration; the default "
                   "for calibrated models) or evenly spaced.")
@click.option("--batch", type=click.IntRange(min=1), default=250, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--tile", type=click.IntRange(min=1), default=None,
              help="Units of TILE × TILE (as encode --tile): crops of that size from a photo source, or image "
                   "files cut into tiles (their sides multiples of TILE). Default: the model's size.")
@flips_option()
@coupling_option()
@fit_variance_option()
@spatial_option()
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@user_errors
def nll(inputs, model, K, n, method, samples, variance, spacing, batch, seed, tile, flips, coupling, fit_variance, spatial,
        as_json):
    """Bits/dim of images through the variational bound L_T + Σ L_{t-1} + L_0.

    INPUTS are image files, or one data source (mnist:test, fashion-mnist:test,
    cifar10:PATH:test, photos:heldout; crops of the model's size for photos).
    Prints the bound and its three terms; --json gives bits_per_dim and terms.

      ddpm-codec nll mnist:test --n 1000 --json
    """
    import torch

    from ddpm_codec import checkpoint
    from ddpm_codec.checkpoint import tile_multiple
    from ddpm_codec.codec import UnitLayout
    from ddpm_codec.data import DataError, load_image, load_source
    from ddpm_codec.diffusion import VarianceType
    from ddpm_codec.eval.nll import BoundMethod, dataset_nll

    if all(_is_image_path(s) for s in inputs):
        imgs = [load_image(s) for s in inputs]
        channels = imgs[0].shape[-1]
        lm = checkpoint.resolve(model, channels)
        size = _tile_option(tile, lm)
        if tile is not None:
            if any(im.shape[0] % size or im.shape[1] % size or im.shape[2] != channels for im in imgs):
                raise InputError(f"--tile {size}: give images of one channel count whose sides are multiples of it")
            cut = UnitLayout(size, tile_multiple(lm.config), even=False)  # (sides are multiples of it)
            imgs = [u.transpose(1, 2, 0) for im in imgs for g in cut.cut([im]) for u in g]
        if any(im.shape != imgs[0].shape for im in imgs):
            raise InputError("images of different shapes; give images of one shape")
        images = np.stack(imgs)
        if n:
            images = images[:n]
    elif len(inputs) == 1:
        src_spec = inputs[0]
        channels = 1 if src_spec.split(":")[0] in ("mnist", "fashion-mnist") else 3
        lm = checkpoint.resolve(model, channels)
        size = _tile_option(tile, lm)
        src = load_source(src_spec, "test", crop=size, channels=lm.channels)
        images = src.take(n or None, np.random.default_rng(seed))
    else:
        raise InputError("give image files, or one data source")
    if images.shape[1:] != (size, size, lm.channels):
        h, w, c = images.shape[1:]
        raise InputError(f"images are {h}×{w}×{c} but model {lm.path.name} takes "
                         f"{size}×{size}×{lm.channels}" + ("" if tile else " (or other tiles: --tile)"))
    sched = lm.chain(K, spacing)
    var = VarianceType(variance) if variance else lm.default_variance()
    try:
        res = dataset_nll(lm, images, sched, torch.Generator().manual_seed(seed), BoundMethod(method),
                          var, batch=batch, samples=samples, flips=flips, coupling=coupling,
                          fit_variance=fit_variance, spatial=spatial)
    except ValueError as e:
        raise DataError(str(e)) from None
    if as_json:
        emit_json(res.to_json())
    else:
        t = res.terms  # (coupled: ρ measured on these images, as `encode` would)
        click.echo(f"{res.bits_per_dim:.4f} bits/dim (± {res.stderr:.4f}) on {res.n} images, K = {res.steps} "
                   f"({res.method}, σ² = {res.variance}{', coupled colours' if res.coupling else ''}"
                   f"{', variance fitted' if res.var_scale else ''}): prior {t['prior']:.5f}, diffusion {t['diffusion']:.4f}, "
                   f"decoder {t['decoder']:.4f}")


@cli.command()
@click.option("--model", default=None, help="Shipped model name or checkpoint path (default: the grey model).")
@click.option("--n", type=click.IntRange(min=1), default=64, show_default=True, help="Number of samples.")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="PNG grid.")
@click.option("--steps", "K", type=click.IntRange(min=1), default=None, help="Respaced K-step chain (default: T).")
@click.option("--method", type=click.Choice(["ancestral", "ddim"]), default="ancestral", show_default=True,
              help="ancestral: Algorithm 2; ddim: Song et al. 2021.")
@click.option("--eta", type=click.FloatRange(0, 1), default=0.0, show_default=True, help="DDIM η.")
@click.option("--variance", type=click.Choice(["beta", "beta_tilde", "calibrated", "learned"]), default="beta",
              show_default=True, help="σ² of the ancestral steps (calibrated and learned need a model that has them).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@user_errors
def sample(model, n, out, K, method, eta, variance, seed, force):
    """Draw samples from the model and save them as one PNG grid."""
    import torch
    from tqdm import tqdm

    from ddpm_codec import checkpoint
    from ddpm_codec.data import image_grid, to_uint8
    from ddpm_codec.diffusion import VarianceType, ddim_sample, sample as ancestral

    _check_writable(out, force)
    lm = checkpoint.resolve(model, 1)
    sched = lm.schedule if K is None or K == lm.schedule.T else lm.schedule.respace_to(K)
    shape = (n, lm.channels, lm.image_size, lm.image_size)
    gen = torch.Generator().manual_seed(seed)
    with tqdm(total=sched.K, file=sys.stderr, unit="step", dynamic_ncols=True) as bar:
        if method == "ancestral":
            x = ancestral(lm.net, sched, shape, gen, lm.variance(sched, VarianceType(variance)), progress=bar.update)
        else:
            x = ddim_sample(lm.net, sched, shape, gen, eta, progress=bar.update)
    _write_atomic(out, _png_bytes(image_grid(to_uint8(x))), force)
    click.echo(f"{n} samples ({method}, K = {sched.K}) -> {out}", err=True)


@cli.group()
def bench():
    """Benchmarks (JSON on stdout). Not tests: run them on an idle machine."""


@bench.command("net")
@click.option("--sizes", default="S,M,L", show_default=True, help="Presets to measure.")
@click.option("--batch", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--seconds", type=float, default=5.0, show_default=True, help="Time per measurement.")
@user_errors
def bench_net(sizes, batch, seconds):
    """Network throughput of each preset: images·steps per second (inference) and
    training images per second (batch 64), at 28×28 grey and 32×32 RGB."""
    import torch

    from ddpm_codec.eval.bench import net_throughput

    out = {"threads": torch.get_num_threads(), "batch": batch, "torch": torch.__version__, "presets": []}
    for size in sizes.split(","):
        for channels, image_size in [(1, 28), (3, 32)]:
            r = net_throughput(size.strip(), channels, image_size, batch, seconds)
            click.echo(f"{size} {channels}×{image_size}²: {r['params']:,} params, "
                       f"{r['infer_img_steps_per_s']:.0f} img·steps/s, train {r['train_img_per_s']:.0f} img/s",
                       err=True)
            out["presets"].append(r)
    emit_json(out)


def _write_atomic(path: Path, data: bytes, force: bool) -> None:
    """Write through a temporary file and rename: never a half-written output."""
    import os
    import tempfile

    _check_writable(path, force)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _png_bytes(arr: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


# auto's switch between the lossless coders, in dimensions (pixels × channels). Measured with the
# shipped mnist 9a3905f2 (learned variance; K = 100, 1 thread), bits-back at grid b = 1 with the
# ⌊1.1^i⌋ batch ramp against the channel file: 25 digits 1.486 (b = 0; b = 1 1.511) against 1.329
# bits/dim; 50 digits 1.227 against 1.2035; 75 digits (58,800 dimensions) 1.1755 against 1.209;
# 100 digits 1.139 against 1.197 — the crossing near 60 digits. (With b = 0 and the previous
# ramp, bits-back took 1.291 on 100 digits and the crossing was at 200.) On photos with
# an earlier model bits-back was ahead by 256×256 (astronaut crop 4.095 as a channel file,
# astronaut + coffee 4.080 by bits-back).
AUTO_CHANNEL_BELOW = 49_152



@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output file (default: IMAGE with suffix .ddpm; required for several images).")
@click.option("--model", default=None, help="Shipped model name or checkpoint path (default: by channels).")
@click.option("--steps", "K", type=click.IntRange(min=1), default=None,
              help="K-step respaced chain (default: 100; more steps: lower rate, slower).")
@click.option("--variance", type=click.Choice(["beta", "beta_tilde", "calibrated", "learned"]), default=None,
              help="Reverse-process variance (default: learned if the model learns it, else calibrated if the "
                   "model has a calibration, else beta_tilde). Lossy files of a learned model use its σ per "
                   "pixel too (format version 4).")
@click.option("--grid-bits", type=click.IntRange(0, 8), default=None,
              help="Bits-back: latent grid δ_t = √β_t / 2^b (default 1; finer fits the bound closer but "
                   "borrows more initial bits).")
@click.option("--spacing", type=click.Choice(["optimal", "even"]), default=None,
              help="Which K steps: optimal (least expected bound, from the model's calibration; the default "
                   "for calibrated models) or evenly spaced.")
@click.option("--batch", type=click.IntRange(min=1), default=None,
              help="Images (tiles) per network batch (default: 100 lossless, 256 lossy).")
@click.option("--lossy", is_flag=True,
              help="Progressive lossy file (Algorithms 3/4): the chain from x_T down, one segment per step; "
                   "decode --upto-step t stops anywhere. Without --rate/--stop-step it ends with a lossless tail.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Lossy: keep the steps that fit in R bits/dim (the file is at most R bits/dim).")
@click.option("--stop-step", type=click.IntRange(min=0), default=None,
              help="Lossy: end the file with x_t (the nearest coded step ≥ t; 0: the whole chain, exact).")
@click.option("--index-bits", type=click.IntRange(1, 24), default=None,
              help="Lossy: bits per channel index, 2^bits candidates per chunk (default 16; each extra bit "
                   "doubles the channel's time).")
@click.option("--kl-per-chunk", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Lossy: target KL(q‖p) per chunk in bits (default 14; about index bits − 2 is best: "
                   "lower costs spare bits, higher drifts from q).")
@click.option("--method", type=click.Choice(["auto", "bits-back", "channel"]), default="auto", show_default=True,
              help="Lossless coder: bits-back ANS over the latent chain (its initial bits are paid once per "
                   "file: best for many images) or the progressive channel file run to its exact end (no "
                   f"initial bits: best for a few small ones). auto: channel below {AUTO_CHANNEL_BELOW:,} "
                   "dimensions, and when no --grid-bits is given.")
@click.option("--tile", type=click.IntRange(min=1), default=None,
              help="Bits-back: the side of the units a larger image is cut into (default: the model's unit, "
                   "its image size unless the model file names another). The network is fully convolutional: a "
                   "larger unit sees across the edges smaller tiles cut (format version 5). A side that is not a "
                   "multiple of it is cut into as many units of nearly equal sides instead of padding the last "
                   "(version 6).")
@flips_option()
@coupling_option()
@fit_variance_option()
@spatial_option()
@adapt_options
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@user_errors
def encode(images, out, model, K, variance, grid_bits, spacing, batch, lossy, rate, stop_step, index_bits,
           kl_per_chunk, method, tile, flips, coupling, fit_variance, spatial, adapt, adapt_precision, force, as_json):
    """Compress images into one .ddpm file: lossless or, with --lossy, progressive.

    Lossless files are exact either way; --method says how (bits-back ANS, or
    the progressive file run to its exact end, which small inputs favour).
    Several images make one archive; an image larger than the model is coded
    as tiles through the same stream.

    \b
      ddpm-codec encode digit.png                     # -> digit.ddpm, lossless
      ddpm-codec encode *.png -o digits.ddpm
      ddpm-codec encode *.png -o d.ddpm --lossy --rate 0.3
      ddpm-codec encode photo.png --lossy --stop-step 50
    """
    from tqdm import tqdm

    from ddpm_codec import checkpoint
    from ddpm_codec.codec import DEFAULT_STEPS, count_units, encode_lossless
    from ddpm_codec.data import load_image
    from ddpm_codec.diffusion import VarianceType

    if out is None:
        if len(images) > 1:
            raise InputError("several images need -o OUT")
        out = images[0].with_suffix(".ddpm")
    _check_writable(out, force)
    names = [p.name for p in images]
    if len(set(names)) != len(names):
        raise InputError("two inputs share a file name; the archive restores images by name")
    loaded = [(p.name, load_image(p)) for p in images]
    channels = {im.shape[-1] for _, im in loaded}
    if len(channels) > 1:
        raise InputError("grey and colour images mixed; encode them into separate files")
    lm = checkpoint.resolve(model, channels.pop())
    if loaded[0][1].shape[-1] != lm.channels:
        raise InputError(f"{loaded[0][0]} has {loaded[0][1].shape[-1]} channel(s), model {lm.path.stem} takes "
                         f"{lm.channels}")
    if not lossy and (rate is not None or stop_step is not None):
        raise InputError("--rate and --stop-step need --lossy")
    if not lossy and method != "channel" and (index_bits or kl_per_chunk):
        raise InputError("--index-bits and --kl-per-chunk need --lossy or --method channel")
    if rate is not None and stop_step is not None:
        raise InputError("give --rate or --stop-step, not both")
    if lossy and method != "auto":
        raise InputError("--method chooses the lossless coder; --lossy files are progressive already")
    dims = sum(im.size for _, im in loaded)
    if method == "channel" and grid_bits is not None:
        raise InputError("--grid-bits is bits-back's latent grid; the channel method has none")
    if tile is not None:
        if lossy or method == "channel":
            raise InputError("--tile is for bits-back files; lossy and channel files use the model's size")
        _tile_option(tile, lm)
    if method == "auto":
        method = ("channel" if dims < AUTO_CHANNEL_BELOW and grid_bits is None and tile is None and not adapt
                  else "bits-back")
    if lossy or method == "channel":
        if coupling:
            raise InputError("--coupling is for bits-back files; lossy and channel files code the channels apart")
        if fit_variance:
            raise InputError("--fit-variance is for bits-back files")
        if spatial:
            raise InputError("--spatial is for bits-back files")
        if adapt:
            raise InputError("--adapt is for bits-back files")
        return _encode_lossy(loaded, lm, out, K, variance, batch, rate, stop_step, index_bits, kl_per_chunk,
                             force, as_json, spacing, flips)
    _check_coupling(coupling, lm, variance)
    _check_fit(fit_variance, lm, variance)
    _check_split(spatial, lm, variance)
    shapes = [im.shape[:2] for _, im in loaded]
    n_units = count_units(lm, shapes, tile)
    with tqdm(total=adapt, file=sys.stderr, unit="step", desc="adapt", disable=not adapt) as abar, \
            tqdm(total=n_units, file=sys.stderr, unit="unit", disable=as_json and n_units < 2) as bar:
        res = encode_lossless(loaded, lm, K or DEFAULT_STEPS, VarianceType(variance) if variance else None,
                              grid_bits, batch or 100, progress=bar.update, spacing=spacing, tile=tile, flips=flips,
                              coupling=coupling, fit_variance=fit_variance, spatial=spatial, adapt=adapt,
                              adapt_precision=adapt_precision, adapt_progress=abar.update)
    _write_atomic(out, res.data, force)
    summary = {"file": str(out), "bytes": len(res.data), "bits_per_dim": res.bits_per_dim, "mode": "lossless",
               "method": "bits-back", "initial_bits": res.initial_bits, "dims": res.dims, "images": len(loaded), "steps": K or DEFAULT_STEPS,
               "variance": res.variance, "model": lm.model_id, "seconds": res.seconds, "net_seconds": res.net_seconds,
               **({"adapt_steps": adapt, "adapt_seconds": res.adapt_seconds, "adapt_bits": res.adapt_bits}
                  if adapt else {})}
    if as_json:
        emit_json(summary)
    else:
        click.echo(f"{out}: {len(res.data)} bytes, {res.bits_per_dim:.4f} bits/dim "
                   f"(initial bits {res.initial_bits / res.dims:.3f} bits/dim of that"
                   + (f", the network's adaptation {res.adapt_bits / res.dims:.4f}" if adapt else "")
                   + f"), {res.seconds:.1f} s" + (f" ({res.adapt_seconds:.1f} s adapting)" if adapt else ""), err=True)


def _encode_lossy(loaded, lm, out, K, variance, batch, rate, stop_step, index_bits, kl_per_chunk, force, as_json,
                  spacing=None, flips=None):
    from tqdm import tqdm

    from ddpm_codec.coding.channel import DEFAULT_INDEX_BITS, DEFAULT_KL_PER_CHUNK
    from ddpm_codec.diffusion import VarianceType
    from ddpm_codec.lossy import DEFAULT_LOSSY_BATCH, DEFAULT_LOSSY_STEPS, encode_lossy

    K = K or DEFAULT_LOSSY_STEPS
    if stop_step is not None and stop_step > lm.schedule.T:
        raise InputError(f"--stop-step must be at most T = {lm.schedule.T}")
    bits, kpc = index_bits or DEFAULT_INDEX_BITS, kl_per_chunk or DEFAULT_KL_PER_CHUNK
    if kpc > 2 * bits:
        raise InputError("--kl-per-chunk may be at most twice --index-bits")
    with tqdm(total=K + 1, file=sys.stderr, unit="step", disable=as_json) as bar:
        res = encode_lossy(loaded, lm, K, VarianceType(variance) if variance else None, stop_step=stop_step,
                           rate=rate, index_bits=bits, kl_per_chunk=kpc, batch=batch or DEFAULT_LOSSY_BATCH,
                           spacing=spacing, progress=bar.update, flips=flips)
    _write_atomic(out, res.data, force)
    last = res.segments[-1].step
    kl = sum(s.kl_bits for s in res.segments) / res.dims
    summary = {"file": str(out), "bytes": len(res.data), "bits_per_dim": res.bits_per_dim, "mode": "lossy",
               "method": "channel",
               "dims": res.dims, "images": len(loaded), "steps": K, "segments": len(res.segments),
               "last_step": last, "exact": res.complete, "kl_bits_per_dim": kl, "header_bytes": res.header_bytes,
               "model": lm.model_id, "seconds": res.seconds, "net_seconds": res.net_seconds,
               "channel_seconds": res.channel_seconds}
    if as_json:
        emit_json(summary)
    else:
        ends = "the lossless tail (decodes exactly)" if res.complete else f"x_{last}"
        click.echo(f"{out}: {len(res.data)} bytes, {res.bits_per_dim:.4f} bits/dim, {len(res.segments)} segments "
                   f"ending with {ends}; KL rate {kl:.4f} bits/dim, {res.seconds:.1f} s", err=True)


def _model_for(header_model: str, model: str | None):
    from ddpm_codec import checkpoint

    if model is not None:
        return checkpoint.resolve(model)
    for name, path in checkpoint.shipped_models().items():
        lm = checkpoint.load(path)
        if lm.model_id == header_model:
            return lm
    raise InputError(f"the file needs model {header_model}, which is not shipped with this ddpm-codec; "
                     "pass --model CKPT")


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="Output image (one image) or directory (an archive). Default: beside FILE.")
@click.option("--model", default=None, help="Checkpoint path, if the file's model is not a shipped one.")
@click.option("--upto-step", type=click.IntRange(min=0), default=None,
              help="Lossy files: decode down to x_t (the nearest coded step ≥ t) and reconstruct from it "
                   "(default: as far as the file goes; 0 with a lossless tail: exact).")
@click.option("--reconstruct", type=click.Choice(["predict", "sample", "ddim"]), default="predict",
              show_default=True,
              help="Lossy files: x̂_0 from x_t in one network call (predict), or run the model down from x_t "
                   "(ancestral sampling or deterministic DDIM).")
@click.option("--seed", type=int, default=0, show_default=True, help="Noise seed for --reconstruct sample.")
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@user_errors
def decode(file, out, model, upto_step, reconstruct, seed, force, as_json):
    """Restore the images of a .ddpm file as PNG.

    Lossless files: nothing is written unless every pixel matches the original's
    checksum. Lossy (progressive) files: the reconstruction from the last step
    decoded; a file cut short decodes up to its last whole step and says so.
    """
    from tqdm import tqdm

    from ddpm_codec.codec import decode as run
    from ddpm_codec.coding.container import read_header, unpack_names

    data = file.read_bytes()
    header = read_header(data)
    names = unpack_names(header.get("names"))
    if not names:
        raise InputError(f"{file}: header lists no images")
    if len(names) == 1 and (out is None or not out.is_dir()):
        paths = [out or file.with_suffix(".png")]
    else:
        folder = out or file.with_suffix("")
        paths = [folder / Path(str(name)).with_suffix(".png").name for name in names]
    if len(set(paths)) != len(paths):
        raise InputError(f"{file}: two images would be written to the same file name")
    for path in paths:
        if path.exists() and not force:
            raise InputError(f"{path} exists; pass --force to overwrite")
    lm = _model_for(header.get("model", "?"), model)
    lossy = header.get("mode") == "lossy"
    if not lossy and (upto_step is not None or reconstruct != "predict"):
        raise InputError("--upto-step and --reconstruct apply to lossy files; this one is lossless")
    if lossy:
        from ddpm_codec.lossy import Reconstruct, decode_lossy

        with tqdm(total=len(header.get("chunks", header.get("chunks_vs_expected", []))) + 2, file=sys.stderr, unit="step", disable=as_json) as bar:
            res = decode_lossy(data, lm, upto_step, Reconstruct(reconstruct), seed, progress=bar.update)
        if res.truncated:
            click.echo(f"warning: {file} is truncated: decoded {res.segments_read} of {res.segments_in_file} "
                       f"segments, up to step {res.step}", err=True)
    else:
        units = sum(int(n) for n in header.get("batches", []) if isinstance(n, int))
        with tqdm(total=units, file=sys.stderr, unit="unit", disable=as_json) as bar:
            res = run(data, lm, progress=bar.update)
    if len(paths) > 1:
        paths[0].parent.mkdir(exist_ok=True)
    targets = list(zip(paths, [im for _, im in res.images]))
    for path, im in targets:
        _write_atomic(path, _png_bytes(im), force)
    summary = {"files": [str(p) for p, _ in targets], "images": len(targets), "bits_per_dim": res.bits_per_dim,
               "seconds": res.seconds}
    if lossy:
        summary.update(mode="lossy", step=res.step, exact=res.exact, truncated=res.truncated,
                       segments_read=res.segments_read, segments_in_file=res.segments_in_file,
                       reconstruct=None if res.exact else reconstruct)
    if as_json:
        emit_json(summary)
    else:
        what = "exact" if not lossy or res.exact else f"from x_{res.step}, {reconstruct}"
        click.echo(f"{file} -> {', '.join(str(p) for p, _ in targets[:3])}{' …' if len(targets) > 3 else ''} "
                   f"({res.bits_per_dim:.4f} bits/dim read, {what})", err=True)


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", default=None, help="Checkpoint path, if the file's model is not a shipped one (to list "
                                           "the step numbers of a chain of optimal steps).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@user_errors
def info(file, model, as_json):
    """Describe a .ddpm file: format version, mode, model, images, steps."""
    from ddpm_codec.codec import info as run
    from ddpm_codec.coding.container import read_header

    data = file.read_bytes()
    header = read_header(data)
    try:
        lm = _model_for(header.get("model", "?"), model)
    except InputError:
        lm = None  # the steps of an optimal chain stay unnamed
    if header.get("mode") == "lossy":
        from ddpm_codec.lossy import lossy_info

        i = lossy_info(data, lm)
        if as_json:
            return emit_json(i)
        tail = ", lossless tail" if i["lossless_tail"] else ""
        segs = i["segments"]
        click.echo(f"{file}: .ddpm version {i['format_version']}, lossy (progressive), model {i['model']}, "
                   f"{len(i['images'])} image(s), {i['K']}-step chain ({i['spacing']} steps, {i['schedule']}, "
                   f"T = {i['T']}), " + (f"flips {i['flips']}, " if i["flips"] != "none" else "") +
                   f"{len(segs) if segs is not None else '?'} segments{tail}, {i['bytes']} bytes"
                   f"{' (TRUNCATED)' if i['truncated'] else ''}")
        if segs is None:
            click.echo(f"  (segment sizes follow from model {i['model']}, which is not here: pass --model)")
            return
        click.echo("  segment  step  chunks    bytes  cumulative bits/dim")
        for n, r in enumerate(i["segments"]):
            click.echo(f"  {n:7d} {r['step']:5d} {r['chunks']:7d} {r['bytes']:8d}  {r['bits_per_dim']:.4f}")
        return
    i = run(data, lm)
    if as_json:
        emit_json(i)
    else:
        n_steps = i["K"] or len(i["steps"] or [])
        units = f"tiles {i['tile']}×{i['tile']}"
        if i["format_version"] in (6, 8, 10, 11, 12, 13):
            ramp = f", the first {i['ramp']} in quarters" if i["ramp"] else ""
            units = f"units of up to {i['tile']}×{i['tile']} (even sides{ramp})"
        click.echo(f"{file}: .ddpm version {i['format_version']}, {i['mode']}, model {i['model']}, "
                   f"{len(i['images'])} image(s), {n_steps} steps ({i['spacing']}, {i['schedule']}, T = {i['T']}), "
                   f"σ² {i['variance']}, {units}, " + (f"flips {i['flips']}, " if i["flips"] != "none" else "")
                   + ("colours coupled (ρ at t = 1: " + ", ".join(f"{v / 256:.3f}" for v in i["coupling"][0]) + "), "
                      if i["coupling"] else "")
                   + (_describe_fit(i["var_scale"]) if i["var_scale"] else "")
                   + (_describe_split(i["spatial"]) if i["spatial"] else "")
                   + (f"network adapted ({i['adapt']['steps']} steps, {len(i['adapt']['widths'])} groups), "
                      if i["adapt"] else "")
                   + f"{i['bytes']} bytes (initial bits {i['initial_bits']})")


@bench.command("codec")
@click.option("--model", default=None, help="Model (default: the shipped grey model).")
@click.option("--data", default="mnist:test", show_default=True, help="Source of the images.")
@click.option("--n", type=click.IntRange(min=1), default=100, show_default=True, help="Images from the source.")
@click.option("--image", "image_files", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Image files instead of a source (e.g. a photo coded through tiles).")
@click.option("--steps", "Ks", default="100", show_default=True, help="Comma-separated K values to measure.")
@click.option("--grid-bits", "grids", default="1", show_default=True, help="Comma-separated b values.")
@click.option("--variance", type=click.Choice(["beta", "beta_tilde", "calibrated", "learned"]), default=None)
@click.option("--batch", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--no-bound", is_flag=True, help="Skip the bound of the same chain (saves K network calls/image).")
@click.option("--spacing", type=click.Choice(["optimal", "even"]), default=None,
              help="Which K steps (default: optimal for calibrated models).")
@click.option("--no-network-alone", is_flag=True,
              help="Skip timing the network by itself (a third of the run's time).")
@click.option("--tile", "tiles", default=None,
              help="Comma-separated tile sides to measure (as encode --tile; default: the model's size).")
@flips_option()
@coupling_option()
@fit_variance_option()
@spatial_option()
@adapt_options
@user_errors
def bench_codec(model, data, n, image_files, Ks, grids, variance, batch, no_bound, spacing, no_network_alone, tiles,
                flips, coupling, fit_variance, spatial, adapt, adapt_precision):
    """Coded bits/dim against the bound of the same K-step chain, initial bits, and time
    (encode and decode, network and coder apart, and the network alone). JSON lines."""
    from ddpm_codec import checkpoint
    from ddpm_codec.data import load_image, load_source
    from ddpm_codec.diffusion import VarianceType
    from ddpm_codec.eval.bench_codec import bench_images
    from tqdm import tqdm

    if image_files:
        images = [(p.name, load_image(p)) for p in image_files]
        lm = checkpoint.resolve(model, images[0][1].shape[-1])
    else:
        lm = checkpoint.resolve(model, 1 if data.split(":")[0] in ("mnist", "fashion-mnist") else 3)
        src = load_source(data, "test", crop=lm.image_size, channels=lm.channels)
        images = [(f"{i}.png", im) for i, im in enumerate(src.take(n))]
    _check_coupling(coupling, lm, variance)
    _check_fit(fit_variance, lm, variance)
    _check_split(spatial, lm, variance)
    for K, b, tile in itertools.product([int(k) for k in Ks.split(",")], [int(g) for g in grids.split(",")],
                                        [int(s) for s in tiles.split(",")] if tiles else [None]):
        r = bench_images(lm, images, K, VarianceType(variance) if variance else None, b, batch, not no_bound,
                         spacing, bar=lambda desc, total: tqdm(total=total, desc=f"K={K} b={b} {desc}",
                                                               file=sys.stderr, unit="tile"),
                         network_alone=not no_network_alone, tile=tile, flips=flips, coupling=coupling,
                         fit_variance=fit_variance, spatial=spatial, adapt=adapt, adapt_precision=adapt_precision)
        r["model"] = lm.model_id
        click.echo(f"K={K} b={b} tile {r['tile']} flips {r['flips']} coupling {r['coupling']} var_scale {r['var_scale']} of {r['var_scale_of']} spatial {r['spatial']}: {r['bits_per_dim']:.4f} bpd coded, net {r['net_bits_per_dim']:.4f}"
                   + (f", bound {r['bound_bits_per_dim']:.4f} (×{r['net_over_bound']:.3f})" if "bound_bits_per_dim" in r else "")
                   + f", initial {r['initial_bits_per_dim']:.3f} bpd"
                   + (f", adaptation {r['adapt_bits_per_dim']:.4f} bpd ({r['adapt_s']:.1f}s)" if adapt else "")
                   + f", encode {r['encode_s']:.1f}s"
                   + (f" (network alone {r['network_only_s']:.1f}s)" if r["network_only_s"] else "")
                   + f", decode {r['decode_s']:.1f}s, exact {r['exact']}",
                   err=True)
        emit_json(r)


@bench.command("fuzz")
@click.option("--model", default=None, help="Model (default: the shipped grey model).")
@click.option("--n", type=click.IntRange(min=1), default=1000, show_default=True, help="Mutated files to decode.")
@click.option("--steps", "K", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--lossy", is_flag=True, help="Fuzz a progressive file: each mutant must be refused or decode to "
                                            "exactly what the intact file gives at the same step.")
@user_errors
def bench_fuzz(model, n, K, seed, lossy):
    """Decode N mutated copies of a small archive (bit flips, truncations, insertions): each must
    be refused with a one-line reason or decode to exactly the original. JSON counts."""
    from ddpm_codec import checkpoint
    from ddpm_codec.codec import encode_lossless
    from ddpm_codec.eval.fuzz import fuzz, fuzz_lossy

    lm = checkpoint.resolve(model, 1)
    rng = np.random.default_rng(seed)
    originals = [rng.integers(0, 256, (lm.image_size, lm.image_size, lm.channels), dtype=np.uint8) // 128 * 255
                 for _ in range(2)]
    if lossy:
        from ddpm_codec.lossy import encode_lossy

        res = encode_lossy([(f"{i}.png", im) for i, im in enumerate(originals)], lm, K)
        return emit_json(fuzz_lossy(res.data, lm, n, seed))
    res = encode_lossless([(f"{i}.png", im) for i, im in enumerate(originals)], lm, K)
    emit_json(fuzz(res.data, originals, lm, n, seed))


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--report", "report_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for rd.md, rd.json, rd.png and progressive.png.")
@click.option("--model", default=None, help="Shipped model name or checkpoint path (default: by channels).")
@click.option("--n", type=click.IntRange(min=1), default=100, show_default=True,
              help="Images taken from a source (ignored for image files).")
@click.option("--steps", "K", type=click.IntRange(min=2), default=None, help="K-step chain (default: 100).")
@click.option("--index-bits", type=click.IntRange(1, 24), default=None, help="Channel index bits (default 16).")
@click.option("--kl-per-chunk", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Target KL per chunk in bits (default 14).")
@click.option("--batch", type=click.IntRange(min=1), default=None, help="Tiles per network batch (default 256).")
@click.option("--title", default="", help="Title for the report and plots.")
@click.option("--force", is_flag=True, help="Write into a report directory that already has a report.")
@flips_option()
@click.option("--json", "as_json", is_flag=True, help="The report's summary as one JSON object on stdout.")
@user_errors
def rd(inputs, report_dir, model, n, K, index_bits, kl_per_chunk, batch, title, flips, force, as_json):
    """Rate–distortion report of progressive lossy coding over reverse time.

    One real progressive file of INPUTS (image files, or one source such as
    mnist:test); for every step its KL rate, coded rate, RMSE and PSNR of the
    reconstruction from x_t; JPEG and WebP lossy curves and PNG / WebP / JPEG XL
    lossless points on the same images. Writes Markdown, JSON and PNG plots.

    \b
      ddpm-codec rd mnist:test --n 100 --report reports/mnist
      ddpm-codec rd photo.png --model photos.pt --report reports/photo
    """
    from tqdm import tqdm

    from ddpm_codec import checkpoint
    from ddpm_codec.coding.channel import DEFAULT_INDEX_BITS, DEFAULT_KL_PER_CHUNK
    from ddpm_codec.data import load_image, load_source
    from ddpm_codec.eval.rd import rd_report
    from ddpm_codec.lossy import DEFAULT_LOSSY_BATCH, DEFAULT_LOSSY_STEPS

    if (report_dir / "rd.json").exists() and not force:
        raise InputError(f"{report_dir} already holds a report; pass --force to overwrite it")
    if all(_is_image_path(s) for s in inputs):
        images = [(Path(s).name, load_image(s)) for s in inputs]
        if len({im.shape[-1] for _, im in images}) > 1:
            raise InputError("grey and colour images mixed; report on them separately")
        lm = checkpoint.resolve(model, images[0][1].shape[-1])
    elif len(inputs) == 1:
        spec = inputs[0]
        channels = 1 if spec.split(":")[0] in ("mnist", "fashion-mnist") else 3
        lm = checkpoint.resolve(model, channels)
        src = load_source(spec, "test", crop=lm.image_size, channels=lm.channels)
        images = [(f"{i:05d}.png", im) for i, im in enumerate(src.take(n, np.random.default_rng(0)))]
    else:
        raise InputError("give image files, or one data source")
    if images[0][1].shape[-1] != lm.channels:
        raise InputError(f"the images have {images[0][1].shape[-1]} channel(s), model {lm.path.stem} takes "
                         f"{lm.channels}")
    bits, kpc = index_bits or DEFAULT_INDEX_BITS, kl_per_chunk or DEFAULT_KL_PER_CHUNK
    if kpc > 2 * bits:
        raise InputError("--kl-per-chunk may be at most twice --index-bits")
    K = K or DEFAULT_LOSSY_STEPS
    with tqdm(total=K + 1, file=sys.stderr, unit="step", disable=as_json) as bar:
        rep = rd_report(images, lm, K, report_dir, bits, kpc, batch or DEFAULT_LOSSY_BATCH, title,
                        progress=bar.update, flips=flips)
    s = rep["summary"]
    if as_json:
        emit_json(s)
    else:
        click.echo(f"{report_dir}/rd.md: {s['images']} image(s), complete file {s['bits_per_dim']:.4f} bits/dim "
                   f"(KL rate {s['kl_rate_total']:.4f}), encode {s['encode_seconds']:.1f} s", err=True)
