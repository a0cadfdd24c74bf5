"""Training loop (Algorithm 1): Adam, EMA, gradient clipping, time budget, resumable checkpoints."""
from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint
from .data import to_model_space
from .diffusion import BoundSampling, VarianceLoss, l_simple
from .nets.unet import UNet, UNetConfig, widen_for_sigma
from .schedule import Schedule


@dataclass
class TrainConfig:
    data: str
    batch_size: int = 64
    lr: float = 5e-4
    warmup_steps: int = 200
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    minutes: float | None = None  # total training-time budget, summed over resumed runs
    steps: int | None = None  # total step budget
    checkpoint_every_s: float = 180.0
    init: str | None = None  # start from this checkpoint's EMA weights (fine-tuning); fresh optimiser and clock
    t_sampling: str = "uniform"  # "uniform" (L_simple) or "bound" (diffusion.BoundSampling)
    bound_steps: int = 100  # K of the chain "bound" sampling trains for
    learn_variance: bool = False  # a second output s per pixel, trained by the hybrid loss (diffusion.VarianceLoss)
    vlb_weight: float = 1e-3  # λ of the hybrid loss
    precision: str = "fp32"  # "bf16": the network's forward pass under bfloat16 autocast (BF16Forward)


PRECISIONS = ("fp32", "bf16")


class BF16Forward(torch.nn.Module):
    """Runs ``net`` under CPU bfloat16 autocast (convolutions and matmuls in bf16, weights, loss,
    gradients' accumulation, optimiser and EMA in fp32) and hands back fp32. A training-speed
    option only: the codec always evaluates the network in fp32."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = self.net(x, t)
        return out.float()


def _ema_update(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        e = list(ema.parameters())
        p = list(net.parameters())
        torch._foreach_mul_(e, decay)
        torch._foreach_add_(e, p, alpha=1.0 - decay)


def train(
    cfg: TrainConfig,
    net_config: UNetConfig,
    sched: Schedule,
    source,
    out: str | Path,
    progress: bool = True,
) -> dict:
    """Train (or resume) into ``out``; returns the final training metadata."""
    if cfg.minutes is None and cfg.steps is None:
        raise ValueError("give a budget: minutes or steps")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"unknown precision {cfg.precision!r}; choose one of {', '.join(PRECISIONS)}")
    out = Path(out)
    if cfg.learn_variance:
        if cfg.t_sampling != "bound":
            raise ValueError("--learn-variance trains for the coded chain: use it with --t-sampling bound")
        net_config = UNetConfig.from_dict({**net_config.to_dict(), "learn_sigma": True})
    with torch.random.fork_rng(devices=[]):  # weight init from the seed, global RNG untouched
        torch.manual_seed(cfg.seed)
        net = UNet(net_config)
    ema = copy.deepcopy(net)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    state = {"step": 0, "elapsed_s": 0.0, "losses": []}
    init_meta = None
    t_calibration = None  # x̂_0 errors "bound" sampling is built from (kept in the checkpoint for resuming)
    var_base = None  # the x̂_0 errors a learned variance is relative to (kept in the checkpoint)
    if cfg.init is not None and not out.exists():
        src = checkpoint.read(cfg.init)
        if cfg.t_sampling == "bound":
            if "calibration" not in src:
                raise checkpoint.CheckpointError(
                    f"--init {cfg.init} has no calibration to build bound sampling from (ddpm-codec calibrate)")
            t_calibration = {"x0_mse": list(src["calibration"]["x0_mse"])}
        # the U-Net is fully convolutional: its weights fit any image size (a model of 32×32 crops
        # can go on with 64×64 ones, --crop); the rest of the network must match
        free = ("learn_sigma", "image_size")
        src_cfg = {k: v for k, v in src["net_config"].items() if k not in free}
        own_cfg = {k: v for k, v in net_config.to_dict().items() if k not in free}
        if src_cfg != own_cfg or src["schedule"] != sched.spec():
            raise checkpoint.CheckpointError(
                f"--init {cfg.init}: its network or schedule differs from this run's (same --size, --schedule, --T)")
        weights = src["ema"]
        if src["net_config"].get("learn_sigma", False) != net_config.learn_sigma:
            if not net_config.learn_sigma:
                raise checkpoint.CheckpointError(f"--init {cfg.init} learns its variance: train it with --learn-variance")
            weights = widen_for_sigma(weights, net_config)
        if net_config.learn_sigma:
            var_base = src.get("var_base") or t_calibration
            var_base = {"x0_mse": list(var_base["x0_mse"])}
        net.load_state_dict(weights)
        ema.load_state_dict(weights)
        init_meta = {"init_source": src.get("train", {}).get("source"),
                     "init_minutes": src.get("train", {}).get("elapsed_s", 0.0) / 60}
    if out.exists():
        ck = checkpoint.read(out)
        if ck["net_config"] != net_config.to_dict() or ck["schedule"] != sched.spec() or "optim" not in ck:
            raise checkpoint.CheckpointError(
                f"{out} exists and is not a resumable run of this configuration; choose another --out")
        net.load_state_dict(ck["raw"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optim"])
        rng.bit_generator.state = ck["rng"]["numpy"]
        gen.set_state(ck["rng"]["torch"])
        state = {k: ck["train"][k] for k in state}
        if ck["train"].get("t_sampling", "uniform") != cfg.t_sampling:
            raise checkpoint.CheckpointError(
                f"{out} was trained with --t-sampling {ck['train'].get('t_sampling', 'uniform')}; resume with it")
        t_calibration = ck.get("t_calibration")
        var_base = ck.get("var_base")
        init_meta = {k: ck["train"][k] for k in ("init_source", "init_minutes") if k in ck["train"]} or None
        print(f"resuming {out} at step {state['step']} ({state['elapsed_s'] / 60:.1f} min trained)", file=sys.stderr)

    t_sampling = None
    if cfg.t_sampling == "bound":
        if t_calibration is None:
            raise checkpoint.CheckpointError("--t-sampling bound needs a calibrated --init checkpoint")
        if "decoder_ge" not in t_calibration:  # measured once, on the starting weights, then kept
            from .likelihood import decoder_error_slope
            x_cal = to_model_space(source.sample(np.random.default_rng(cfg.seed + 1), 256))
            t_calibration["decoder_ge"] = decoder_error_slope(
                ema, sched, x_cal, torch.Generator().manual_seed(cfg.seed + 1), np.asarray(t_calibration["x0_mse"]))
        t_sampling = BoundSampling.build(sched, np.asarray(t_calibration["x0_mse"]), cfg.bound_steps,
                                         t_calibration["decoder_ge"])
        print(f"bound sampling for K = {cfg.bound_steps}: decoder slope {t_calibration['decoder_ge']:.3f} bits/dim, "
              f"P(t = 1) = {float(t_sampling.probs_t[1]):.3f}", file=sys.stderr)
    elif cfg.t_sampling != "uniform":
        raise ValueError(f"unknown t sampling {cfg.t_sampling!r}")
    variance_loss = None
    if net_config.learn_sigma:
        if var_base is None:
            raise checkpoint.CheckpointError("--learn-variance needs a calibrated --init checkpoint")
        variance_loss = VarianceLoss.build(sched, np.asarray(var_base["x0_mse"]), t_sampling.steps, cfg.vlb_weight)

    def done() -> bool:
        if cfg.steps is not None and state["step"] >= cfg.steps:
            return True
        return cfg.minutes is not None and state["elapsed_s"] >= cfg.minutes * 60

    def save() -> None:
        meta = {**asdict(cfg), **state, "source": source.name, "images_seen": state["step"] * cfg.batch_size,
                **(init_meta or {})}
        checkpoint.save(out, {
            "net_config": net_config.to_dict(), "schedule": sched.spec(),
            "ema": ema.state_dict(), "raw": net.state_dict(), "optim": opt.state_dict(),
            "rng": {"numpy": rng.bit_generator.state, "torch": gen.get_state()}, "train": meta,
            **({"t_calibration": t_calibration} if t_calibration is not None else {}),
            **({"var_base": var_base} if var_base is not None else {}),
        })

    total = cfg.steps if cfg.steps is not None else None
    bar = tqdm(total=total, initial=state["step"], disable=not progress, file=sys.stderr,
               unit="step", dynamic_ncols=True)
    net.train()
    forward = BF16Forward(net) if cfg.precision == "bf16" else net
    last_ck = time.monotonic()
    window: list[float] = []
    while not done():
        t0 = time.monotonic()
        lr = cfg.lr * min(1.0, (state["step"] + 1) / max(1, cfg.warmup_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        x0 = to_model_space(source.sample(rng, cfg.batch_size))
        loss = l_simple(forward, sched, x0, gen, t_sampling, variance_loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss became {loss.item()} at step {state['step']}")
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        state["step"] += 1
        _ema_update(ema, net, min(cfg.ema_decay, (1 + state["step"]) / (10 + state["step"])))
        window.append(loss.item())
        if len(window) == 100:
            state["losses"].append([state["step"], float(np.mean(window))])
            window.clear()
        state["elapsed_s"] += time.monotonic() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", min=f"{state['elapsed_s'] / 60:.1f}", refresh=False)
        if time.monotonic() - last_ck >= cfg.checkpoint_every_s:
            save()
            last_ck = time.monotonic()
    bar.close()
    save()
    return {**state, "source": source.name}
