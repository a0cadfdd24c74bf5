"""Speed measurements (benchmarks, not tests)."""
from __future__ import annotations

import time

import torch

from ddpm_codec.diffusion import l_simple
from ddpm_codec.nets.unet import UNet, count_parameters, preset_config
from ddpm_codec.schedule import ScheduleKind, make_schedule


def _rate(fn, items: int, seconds: float) -> float:
    fn()  # warm-up
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += items
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return n / dt


def net_throughput(size: str, channels: int, image_size: int, batch: int = 256, seconds: float = 5.0) -> dict:
    """Inference images·steps/s at ``batch`` (channels_last, no grad) and training images/s at batch 64."""
    cfg = preset_config(size, channels, image_size)
    net = UNet(cfg)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, image_size, image_size, generator=gen)
    t = torch.randint(1, 1001, (batch,), generator=gen).float()
    net.eval()
    with torch.no_grad():
        xc = x.contiguous(memory_format=torch.channels_last)
        infer = _rate(lambda: net(xc, t), batch, seconds)
        infer_contig = _rate(lambda: net(x, t), batch, seconds)
    net.train()
    sched = make_schedule(ScheduleKind.LINEAR, 1000)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    xb = x[:64]

    def step():
        loss = l_simple(net, sched, xb, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()

    train = _rate(step, 64, seconds)
    return {"size": size, "channels": channels, "image_size": image_size, "params": count_parameters(net),
            "infer_img_steps_per_s": infer, "infer_contiguous_img_steps_per_s": infer_contig,
            "train_img_per_s": train}
