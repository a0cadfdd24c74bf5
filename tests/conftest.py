import numpy as np
import pytest
import torch

from ddpm_codec.data import ArraySource
from ddpm_codec.nets.unet import UNetConfig
from ddpm_codec.schedule import ScheduleKind, make_schedule
from ddpm_codec.train import TrainConfig, train

TINY = UNetConfig(in_channels=1, image_size=8, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                  attn_levels=(1,), groups=4)


def tiny_images(n: int = 32, seed: int = 0) -> np.ndarray:
    """Blobby 8×8 grey images: a bright square at a random place on a dark background."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 8, 8, 1), dtype=np.uint8)
    for i in range(n):
        y, x = rng.integers(0, 5, 2)
        out[i, y:y + 3, x:x + 3] = 255
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny model trained for a few steps (T = 100): enough to exercise every code path."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    sched = make_schedule(ScheduleKind.LINEAR, 100)
    cfg = TrainConfig(data="tiny", batch_size=16, steps=30, seed=0, warmup_steps=5)
    train(cfg, TINY, sched, ArraySource("tiny", tiny_images()), path, progress=False)
    return path


@pytest.fixture(autouse=True)
def _no_global_rng_use():
    torch.manual_seed(12345)  # any hidden use of the global RNG would still be reproducible
    yield
