import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from ddpm_codec import checkpoint
from ddpm_codec.data import ArraySource
from ddpm_codec.nets.unet import UNet, count_parameters, preset_config
from ddpm_codec.schedule import ScheduleKind, make_schedule
from ddpm_codec.train import BF16Forward, TrainConfig, train
from conftest import TINY, tiny_images


def test_presets_have_the_advertised_sizes():
    sizes = {s: count_parameters(UNet(preset_config(s, 1, 28))) for s in "SML"}
    assert 0.4e6 < sizes["S"] < 1e6 and 1.5e6 < sizes["M"] < 3e6 and 6e6 < sizes["L"] < 10e6
    for c, size in [(1, 28), (3, 32)]:
        net = UNet(preset_config("S", c, size))
        assert net(torch.zeros(2, c, size, size), torch.tensor([1.0, 1000.0])).shape == (2, c, size, size)


def test_training_lowers_the_loss(tmp_path):
    sched = make_schedule(ScheduleKind.LINEAR, 100)
    cfg = TrainConfig(data="tiny", batch_size=16, steps=300, seed=0, warmup_steps=10, lr=2e-3)
    meta = train(cfg, TINY, sched, ArraySource("tiny", tiny_images()), tmp_path / "a.pt", progress=False)
    losses = [l for _, l in meta["losses"]]
    assert len(losses) == 3
    assert losses[-1] < 0.7 * losses[0]


def test_bf16_training_runs_the_network_in_bf16_and_keeps_fp32_weights(tmp_path):
    sched = make_schedule(ScheduleKind.LINEAR, 100)
    src = ArraySource("tiny", tiny_images())
    cfg = TrainConfig(data="tiny", batch_size=16, steps=300, seed=0, warmup_steps=10, lr=2e-3, precision="bf16")
    meta = train(cfg, TINY, sched, src, tmp_path / "a.pt", progress=False)
    losses = [l for _, l in meta["losses"]]
    ck = checkpoint.read(tmp_path / "a.pt")
    assert losses[-1] < 0.7 * losses[0] and ck["train"]["precision"] == "bf16"
    assert all(v.dtype == torch.float32 for v in [*ck["ema"].values(), *ck["raw"].values()])
    net = checkpoint.load(tmp_path / "a.pt").net
    x, t = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1.0, 5.0, 50.0, 100.0])
    with torch.no_grad():
        full, half = net(x, t), BF16Forward(net)(x, t)
    assert half.dtype == torch.float32 and not torch.equal(full, half)  # the autocast is on ...
    assert torch.allclose(full, half, atol=0.05 * float(full.abs().max()))  # ... computing the same function
    # precision may change on resuming (a training-speed option, not part of the model)
    meta = train(replace(cfg, steps=310, precision="fp32"), TINY, sched, src, tmp_path / "a.pt", progress=False)
    assert meta["step"] == 310 and checkpoint.read(tmp_path / "a.pt")["train"]["precision"] == "fp32"
    with pytest.raises(ValueError, match="unknown precision"):
        train(replace(cfg, precision="fp16"), TINY, sched, src, tmp_path / "b.pt", progress=False)


def test_checkpoint_round_trip_gives_identical_outputs(tiny_checkpoint):
    a = checkpoint.load(tiny_checkpoint)
    b = checkpoint.load(tiny_checkpoint)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1.0, 5.0, 50.0, 100.0])
    assert torch.equal(a.net(x, t), b.net(x, t))
    assert a.model_id == b.model_id and len(a.model_id) == 16
    assert a.schedule.T == 100 and a.train["step"] == 30
    # the id follows the weights, not the file: stripping the optimizer keeps it, changing a weight does not
    ck = checkpoint.read(tiny_checkpoint)
    assert checkpoint.model_id(ck["net_config"], ck["schedule"], ck["ema"]) == a.model_id
    ck["ema"]["conv_in.bias"] = ck["ema"]["conv_in.bias"] + 1e-6
    assert checkpoint.model_id(ck["net_config"], ck["schedule"], ck["ema"]) != a.model_id


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    sched = make_schedule(ScheduleKind.LINEAR, 100)
    src = ArraySource("tiny", tiny_images())
    base = dict(data="tiny", batch_size=8, seed=3, warmup_steps=5)
    train(TrainConfig(**base, steps=12), TINY, sched, src, tmp_path / "r.pt", progress=False)
    train(TrainConfig(**base, steps=20), TINY, sched, src, tmp_path / "r.pt", progress=False)  # resumes at 12
    train(TrainConfig(**base, steps=20), TINY, sched, src, tmp_path / "u.pt", progress=False)
    r, u = checkpoint.read(tmp_path / "r.pt"), checkpoint.read(tmp_path / "u.pt")
    assert r["train"]["step"] == u["train"]["step"] == 20
    for name in u["ema"]:
        assert torch.equal(r["ema"][name], u["ema"][name]), name


def test_resume_refuses_another_configuration(tmp_path, tiny_checkpoint):
    sched = make_schedule(ScheduleKind.COSINE, 100)
    with pytest.raises(checkpoint.CheckpointError, match="not a resumable run"):
        train(TrainConfig(data="tiny", steps=40), TINY, sched, ArraySource("tiny", tiny_images()),
              tiny_checkpoint, progress=False)


def test_init_starts_from_another_runs_weights(tmp_path, tiny_checkpoint):
    """--init: fine-tuning starts at the given run's EMA weights, with its own clock and optimiser."""
    sched = make_schedule(ScheduleKind.LINEAR, 100)
    src = ArraySource("other", tiny_images(seed=4))
    lr0 = dict(data="other", batch_size=8, seed=1, warmup_steps=5, lr=1e-12, ema_decay=1.0, steps=2)
    train(TrainConfig(**lr0, init=str(tiny_checkpoint)), TINY, sched, src, tmp_path / "f.pt", progress=False)
    f, base = checkpoint.read(tmp_path / "f.pt"), checkpoint.read(tiny_checkpoint)
    assert f["train"]["step"] == 2 and f["train"]["init_source"] == "tiny"
    for name in base["ema"]:  # a learning rate of 1e-12 leaves the starting weights (to float precision)
        assert torch.allclose(f["raw"][name], base["ema"][name], atol=1e-6), name
    fresh = checkpoint.read(tiny_checkpoint)  # without --init the weights come from the seed instead
    train(TrainConfig(**lr0), TINY, sched, src, tmp_path / "g.pt", progress=False)
    g = checkpoint.read(tmp_path / "g.pt")
    assert not all(torch.allclose(g["raw"][n], fresh["ema"][n], atol=1e-6) for n in fresh["ema"])
    with pytest.raises(checkpoint.CheckpointError, match="differs"):
        train(TrainConfig(**lr0, init=str(tiny_checkpoint)), TINY, make_schedule(ScheduleKind.COSINE, 100), src,
              tmp_path / "h.pt", progress=False)
    # the U-Net is fully convolutional: a run on larger images may start from it (other widths may not)
    big = ArraySource("big", np.kron(tiny_images(seed=5), np.ones((1, 2, 2, 1), dtype=np.uint8)))
    train(TrainConfig(**{**lr0, "data": "big"}, init=str(tiny_checkpoint)), replace(TINY, image_size=16), sched, big,
          tmp_path / "b.pt", progress=False)
    b = checkpoint.read(tmp_path / "b.pt")
    assert b["net_config"]["image_size"] == 16 and all(
        torch.allclose(b["raw"][n], base["ema"][n], atol=1e-6) for n in base["ema"])
    with pytest.raises(checkpoint.CheckpointError, match="differs"):
        train(TrainConfig(**lr0, init=str(tiny_checkpoint)), replace(TINY, base_channels=16), sched, src,
              tmp_path / "w.pt", progress=False)


def test_bad_checkpoints(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(checkpoint.CheckpointError, match="not a ddpm-codec checkpoint"):
        checkpoint.load(tmp_path / "junk.pt")
    with pytest.raises(checkpoint.CheckpointError, match="no such checkpoint"):
        checkpoint.load(tmp_path / "missing.pt")
    with pytest.raises(checkpoint.CheckpointError, match="no model"):
        checkpoint.resolve("no-such-model")


def _calibrated(tmp_path, tiny_checkpoint):
    path = tmp_path / "cal.pt"
    checkpoint.calibrate(tiny_checkpoint, tiny_images(16), torch.Generator().manual_seed(0), "tiny", out=path)
    return path


def test_bound_sampling_weights_are_the_bounds_gradient():
    """p_t · w_t must be proportional to ∂(expected bound)/∂e_ε(t) on every chain step, the decoder
    included: then E_p[w_t ‖ε − ε̂‖²] has the bound's gradient (an unbiased estimate)."""
    import numpy as np
    from ddpm_codec.diffusion import BoundSampling
    from ddpm_codec.schedule import jump_costs

    sched = make_schedule(ScheduleKind.COSINE, 100)
    t_all = np.arange(101)
    e = 0.3 * (1 - sched.alpha_bar) ** 0.7 * (1 + 0.1 * np.sin(t_all))  # an x̂_0 error table, rising with t
    e[0] = 0.0
    bs = BoundSampling.build(sched, e, 12, decoder_ge=0.4)
    p, w = bs.probs_t.numpy(), bs.weight_t.numpy().astype(np.float64)
    assert abs(p.sum() - 1) < 1e-12 and len(bs.steps) == 12 and bs.steps[0] == 1 and bs.steps[-1] == 100
    assert set(np.nonzero(p)[0]) == set(bs.steps)
    ab = sched.alpha_bar
    to_eps = ab / np.where(t_all > 0, 1 - ab, 1)  # e_ε = e · ᾱ / (1 − ᾱ)
    ratios = []
    for s, t in zip(bs.steps[:-1], bs.steps[1:]):
        if w[t] >= 999 * w[bs.steps[1]]:  # capped (ᾱ ≈ 0 at the very end), not an unbiased weight
            continue
        h = 1e-6 * e[t]
        up, down = e.copy(), e.copy()
        up[t] += h
        down[t] -= h
        d_cost_d_e = (jump_costs(sched, up, t, s) - jump_costs(sched, down, t, s)) / (2 * h)
        ratios.append(p[t] * w[t] / (d_cost_d_e / to_eps[t]))
    ratios.append(p[1] * w[1] / (0.4 / (e[1] * to_eps[1])))  # decoder: g = decoder_ge / e(1)
    assert len(ratios) >= 8
    assert np.allclose(ratios, ratios[0], rtol=1e-4), ratios


@pytest.mark.parametrize("e1, expected", [(1e-2, 1 / (2 * math.log(2))), (1e-6, 0.0)])
def test_decoder_error_slope_in_its_two_limits(e1, expected):
    """With x̂_0 = x_0 + N(0, e) and σ² = e: a σ much wider than a pixel's bin gives the Gaussian
    slope 1/(2 ln 2); a σ far inside the bin of a grid value gives 0 (L_0 is ≈ 0 whatever the error)."""
    import numpy as np
    from ddpm_codec.likelihood import decoder_error_slope

    sched = make_schedule(ScheduleKind.COSINE, 100)
    x0 = torch.full((64, 1, 8, 8), 2 * 128 / 255 - 1)  # a grid value, far from the edges
    err = math.sqrt(e1) * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    ab1 = float(sched.alpha_bar[1])

    def net(xt, _t):  # returns the ε for which x̂_0 = x_0 + err exactly
        return (xt - math.sqrt(ab1) * (x0 + err)) / math.sqrt(1 - ab1)

    table = np.full(101, 0.1)
    table[0], table[1] = 0.0, e1
    slope = decoder_error_slope(net, sched, x0, torch.Generator().manual_seed(2), table)
    assert abs(slope - expected) < 0.03, slope


def test_bound_sampling_trains_resumes_and_refuses_mixing(tmp_path, tiny_checkpoint):
    sched = make_schedule(ScheduleKind.LINEAR, 100)
    src = ArraySource("tiny", tiny_images())
    cal = _calibrated(tmp_path, tiny_checkpoint)
    base = dict(data="tiny", batch_size=8, seed=3, warmup_steps=5, init=str(cal), t_sampling="bound", bound_steps=8)
    train(TrainConfig(**base, steps=6), TINY, sched, src, tmp_path / "r.pt", progress=False)
    train(TrainConfig(**base, steps=10), TINY, sched, src, tmp_path / "r.pt", progress=False)  # resumes at 6
    train(TrainConfig(**base, steps=10), TINY, sched, src, tmp_path / "u.pt", progress=False)
    r, u = checkpoint.read(tmp_path / "r.pt"), checkpoint.read(tmp_path / "u.pt")
    assert r["t_calibration"] == u["t_calibration"] and r["train"]["t_sampling"] == "bound"
    for name in u["ema"]:
        assert torch.equal(r["ema"][name], u["ema"][name]), name
    with pytest.raises(checkpoint.CheckpointError, match="resume with it"):
        train(TrainConfig(data="tiny", batch_size=8, seed=3, steps=12), TINY, sched, src, tmp_path / "r.pt",
              progress=False)
    with pytest.raises(checkpoint.CheckpointError, match="no calibration"):
        train(TrainConfig(**{**base, "init": str(tiny_checkpoint)}, steps=2), TINY, sched, src,
              tmp_path / "x.pt", progress=False)
