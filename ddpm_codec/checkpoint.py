"""One-file checkpoints: weights (EMA and raw), schedule, network config, training state.

The model id is a hash of what decides the network's outputs — the EMA weights,
the network config and the schedule — so re-saving a model (or stripping its
optimizer state for shipping) keeps its id.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .diffusion import FLIPS, VarianceType, ensemble, model_variance
from .nets.unet import UNet, UNetConfig
from .schedule import Schedule, optimal_steps, schedule_from_spec

FORMAT = "ddpm-codec-checkpoint"
VERSION = 1
MODELS_DIR = Path(__file__).parent / "models"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line for the user."""


def model_id(net_config: dict, schedule_spec: dict, ema_state: dict, calibration: dict | None = None,
             var_base: dict | None = None) -> str:
    """Hash of everything that decides the codec's numbers: config, schedule, EMA weights, the
    variance calibration (if any) and a learned variance's base (if any)."""
    h = hashlib.sha256()
    desc = {"net": net_config, "schedule": schedule_spec}
    if calibration is not None:
        desc["x0_mse"] = [float(v).hex() for v in calibration["x0_mse"]]
    if var_base is not None:
        desc["var_base"] = [float(v).hex() for v in var_base["x0_mse"]]
    h.update(json.dumps(desc, sort_keys=True).encode())
    for name in sorted(ema_state):
        t = ema_state[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class LoadedModel:
    net: UNet  # EMA weights, eval mode
    config: UNetConfig
    schedule: Schedule  # the full T-step schedule the network was trained on
    model_id: str
    path: Path
    train: dict = field(default_factory=dict)
    x0_mse: np.ndarray | None = None  # e(t), t = 0 … T: see VarianceType.CALIBRATED
    var_base: np.ndarray | None = None  # the e(t) a learned variance was trained against (VarianceType.LEARNED)
    tile: int | None = None  # the units the codec cuts larger images into, if not image_size (measured: export's)
    flips: str = "none"  # the flip ensemble the codec runs the network as by default (``diffusion.FLIPS``; export's)
    _optimal: dict = field(default_factory=dict, repr=False)  # K -> chain of optimal steps

    def default_variance(self) -> VarianceType:
        """The learned variance when the model has one, else the calibrated variance when the model
        has a calibration, else β̃ (the coder's and nll's default)."""
        if self.var_base is not None:
            return VarianceType.LEARNED
        return VarianceType.CALIBRATED if self.x0_mse is not None else VarianceType.FIXED_SMALL

    def variance(self, sched: Schedule, var_type: VarianceType):
        """The σ² table of ``var_type`` for the chain ``sched`` (``diffusion.LearnedVariance`` for LEARNED)."""
        if var_type is VarianceType.LEARNED:
            if self.var_base is None:
                raise CheckpointError(f"{self.path.name} does not learn its variance (train --learn-variance)")
            return model_variance(sched, var_type, self.var_base)
        e = self.x0_mse if self.x0_mse is not None else self.var_base  # a learned model not calibrated again
        if var_type is VarianceType.CALIBRATED and e is None:
            raise CheckpointError(f"{self.path.name} has no variance calibration; run `ddpm-codec calibrate` on it")
        return model_variance(sched, var_type, e)

    def error_table(self, var_type: VarianceType) -> np.ndarray:
        """The e(t) table [T+1] that ``variance(…, var_type)`` builds σ² on (calibrated or learned)."""
        e = self.var_base if var_type is VarianceType.LEARNED else (
            self.x0_mse if self.x0_mse is not None else self.var_base)
        if e is None:
            raise CheckpointError(f"{self.path.name} has no variance calibration; run `ddpm-codec calibrate` on it")
        return e

    def chain(self, K: int | None, spacing: str | None = None) -> Schedule:
        """The K-step chain the codec and ``nll --steps K`` use. ``spacing`` "optimal" (the default
        for a calibrated model): the steps of least expected bound (``schedule.optimal_steps``,
        computed from the calibration); "even": evenly spaced. K None or T: the full schedule."""
        if not K or K == self.schedule.T:
            return self.schedule
        if self._spacing(spacing) == "even":
            return self.schedule.respace_to(K)
        if K not in self._optimal:  # a DP over T² jumps: once per K, shared by encoder, decoder and info
            self._optimal[K] = self.schedule.respace(optimal_steps(self.schedule, self.x0_mse, K))
        return self._optimal[K]

    def _spacing(self, spacing: str | None) -> str:
        spacing = spacing or ("optimal" if self.x0_mse is not None else "even")
        if spacing not in ("optimal", "even"):
            raise ValueError(f"unknown spacing {spacing!r}")
        if spacing == "optimal" and self.x0_mse is None:
            raise CheckpointError(f"{self.path.name} has no calibration to choose steps with; use even spacing")
        return spacing

    def chain_spec(self, K: int | None, spacing: str | None = None) -> dict:
        """The header's description of ``chain(K, spacing)``: optimal steps are named, not listed
        (the decoder has the model, whose id fixes the calibration they come from)."""
        sched = self.chain(K, spacing)
        if sched is not self.schedule and self._spacing(spacing) == "optimal":
            return {"kind": self.schedule.kind.value, "T": self.schedule.T, "K": sched.K, "spacing": "optimal"}
        return sched.spec()

    def chain_from_spec(self, spec: dict) -> Schedule:
        """The chain a file's header names (``chain_spec``) or lists."""
        if spec.get("spacing") == "optimal":
            if spec.get("kind") != self.schedule.kind.value or int(spec.get("T", -1)) != self.schedule.T:
                raise ValueError("the header's schedule is not the model's")
            return self.chain(int(spec["K"]), "optimal")
        return schedule_from_spec(spec)

    @property
    def channels(self) -> int:
        return self.config.in_channels

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def flips_or_default(self, flips: str | None) -> str:
        """``flips``, or the model's default for None."""
        return self.flips if flips is None else flips

    def network(self, flips: str | None = None):
        """The network as the codec runs it: the EMA weights, or their flip ensemble (``flips``;
        None: the model's default)."""
        return ensemble(self.net, self.flips_or_default(flips))

    @property
    def unit(self) -> int:
        """The side of the units larger images are cut into by default (``codec.unit_size``)."""
        return self.tile or self.config.image_size


def save(path: str | os.PathLike, payload: dict) -> None:
    """Write a checkpoint atomically (a temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"format": FORMAT, "version": VERSION, **payload}, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds here
        raise CheckpointError(f"{path}: not a ddpm-codec checkpoint ({type(e).__name__})") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a ddpm-codec checkpoint")
    if ck.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {ck.get('version')} (this ddpm-codec reads {VERSION})")
    return ck


def load(path: str | os.PathLike) -> LoadedModel:
    ck = read(path)
    cfg = UNetConfig.from_dict(ck["net_config"])
    net = UNet(cfg)
    net.load_state_dict(ck["ema"])
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    cal = ck.get("calibration")
    base = ck.get("var_base")
    if (base is not None) != cfg.learn_sigma:
        raise CheckpointError(f"{path}: a learned variance needs both the network's second output and its base")
    return LoadedModel(net=net, config=cfg, schedule=schedule_from_spec(ck["schedule"]),
                       model_id=model_id(ck["net_config"], ck["schedule"], ck["ema"], cal, base),
                       path=Path(path), train=dict(ck.get("train", {})),
                       x0_mse=None if cal is None else np.asarray(cal["x0_mse"], dtype=np.float64),
                       var_base=None if base is None else np.asarray(base["x0_mse"], dtype=np.float64),
                       tile=_tile(ck.get("tile"), cfg, path), flips=_flips(ck.get("flips", "none"), path))


MAX_TILE = 512  # largest unit side a model codes (one unit's activations grow with its area)


def tile_multiple(cfg: UNetConfig) -> int:
    """Unit sides the U-Net takes: multiples of 2^(levels − 1) (each level halves the size)."""
    return 1 << (len(cfg.channel_mult) - 1)


def takes_tile(tile, cfg: UNetConfig) -> bool:
    m = tile_multiple(cfg)
    return isinstance(tile, int) and m <= tile <= MAX_TILE and tile % m == 0


def _tile(tile, cfg: UNetConfig, path) -> int | None:
    if tile is not None and not takes_tile(tile, cfg):
        raise CheckpointError(f"{path}: bad default tile {tile!r}")
    return tile


def _flips(flips, path) -> str:
    if flips not in FLIPS:
        raise CheckpointError(f"{path}: bad default flips {flips!r}")
    return flips


def shipped_models() -> dict[str, Path]:
    return {p.stem: p for p in sorted(MODELS_DIR.glob("*.pt"))}


def resolve(model: str | None, channels: int | None = None) -> LoadedModel:
    """A shipped model's name or a checkpoint path; None picks the shipped default for ``channels``."""
    ships = shipped_models()
    if model is None:
        want = {1: "mnist", 3: "photos"}.get(channels or 1)
        if want not in ships:
            raise CheckpointError(
                f"no shipped default model for {channels}-channel images in this install; pass --model CKPT")
        return load(ships[want])
    if model in ships:
        return load(ships[model])
    if Path(model).exists():
        return load(model)
    names = ", ".join(ships) or "none"
    raise CheckpointError(f"no model {model!r}: not a checkpoint file nor a shipped model (shipped: {names})")


def calibrate(path: str | os.PathLike, images_u8: np.ndarray, gen: torch.Generator, source: str,
              out: str | os.PathLike | None = None, progress=None) -> LoadedModel:
    """Measure e(t) (``likelihood.x0_mse_per_step``) on uint8 images [N, H, W, C] — training
    data, never the evaluation set — and store it in the checkpoint (``out``, default in place)."""
    from .data import to_model_space
    from .likelihood import x0_mse_per_step

    lm = load(path)
    with torch.no_grad():
        e = x0_mse_per_step(lm.net, lm.schedule, to_model_space(images_u8), gen, progress)
    ck = read(path)
    ck["calibration"] = {"x0_mse": e.tolist(), "n_images": int(len(images_u8)), "source": source}
    save(out or path, {k: v for k, v in ck.items() if k not in ("format", "version")})
    return load(out or path)


def export(src: str | os.PathLike, dst: str | os.PathLike, tile: int | None = None,
           flips: str | None = None) -> LoadedModel:
    """A shippable copy of a checkpoint: EMA weights, config, schedule, calibration and training
    metadata; no raw weights, optimizer or RNG state (so it cannot be resumed). Same model id.
    ``tile``: the units the codec cuts larger images into by default, when a size other than the
    training crops' measured better (the network is fully convolutional); not part of the id,
    since files name their tile. ``flips``: the flip ensemble the codec runs by default
    (``diffusion.FlipEnsemble``), likewise named by the files that use it."""
    ck = read(src)
    keep = {k: ck[k] for k in ("net_config", "schedule", "ema", "train", "calibration", "var_base") if k in ck}
    if tile is not None:
        keep["tile"] = int(tile)
    if flips not in (None, "none"):
        keep["flips"] = _flips(flips, dst)
    keep["train"] = {k: v for k, v in keep.get("train", {}).items() if k != "losses"}
    save(dst, keep)
    out = load(dst)
    if out.model_id != load(src).model_id:  # pragma: no cover - a bug, never a user error
        raise AssertionError("export changed the model id")
    return out
