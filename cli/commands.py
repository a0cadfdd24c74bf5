"""Subcommands of `ddpm-codec` (thin: parse, call the library, print)."""
from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np

from .main import InputError, cli, emit_json, user_errors

SOURCES_HELP = ("mnist[:train|valid|test], fashion-mnist[:train|test], cifar10:PATH[:train|test], "
                "photos[:train|heldout|all] (scikit-image's photos), or a folder of images")


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
@user_errors
def train(data, size, minutes, steps, out, schedule, T, batch, lr, ema, dropout, crop, seed, checkpoint_every):
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
                      steps=steps, checkpoint_every_s=checkpoint_every * 60)
    meta = run(cfg, net_cfg, sched, source, out)
    click.echo(f"trained {meta['step']} steps in {meta['elapsed_s'] / 60:.1f} min -> {out}", err=True)
