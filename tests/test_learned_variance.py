"""A learned per-pixel reverse variance (train --learn-variance, VarianceType.LEARNED)."""
import math

import numpy as np
import pytest
import torch
from conftest import TINY, tiny_images

from ddpm_codec import checkpoint
from ddpm_codec.codec import decode, encode_lossless, info
from ddpm_codec.data import ArraySource, to_model_space
from ddpm_codec.diffusion import (LearnedVariance, S_MAX, S_MIN, S_STEPS, VarianceLoss, VarianceType, exp_s,
                                  model_variance, q_sample, split_output)
from ddpm_codec.likelihood import LN2, bound_full, step_term
from ddpm_codec.coding.container import (LOSSY_LEARNED_VERSION, LOSSY_PREDICTED_VERSION, FormatError, pack_segments,
                                         unpack_segments)
from ddpm_codec.lossy import decode_lossy, encode_lossy, exact_chain_kl, lossy_info
from ddpm_codec.nets.unet import UNet, UNetConfig, widen_for_sigma
from ddpm_codec.schedule import ScheduleKind, make_schedule
from ddpm_codec.train import TrainConfig, train

SCHED = make_schedule(ScheduleKind.LINEAR, 100)


@pytest.fixture(scope="module")
def calibrated(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "cal.pt"
    return checkpoint.calibrate(tiny_checkpoint, tiny_images(16, seed=9), torch.Generator().manual_seed(0), "tiny",
                                out=out)


@pytest.fixture(scope="module")
def learned(calibrated, tmp_path_factory):
    """The tiny calibrated model trained on with --learn-variance (not calibrated again: even steps)."""
    out = tmp_path_factory.mktemp("lv") / "lv.pt"
    cfg = TrainConfig(data="tiny", batch_size=16, seed=3, warmup_steps=5, steps=60, lr=2e-3, init=str(calibrated.path),
                      t_sampling="bound", bound_steps=10, learn_variance=True, vlb_weight=1e-2)
    train(cfg, TINY, SCHED, ArraySource("tiny", tiny_images()), out, progress=False)
    return checkpoint.load(out)


def test_exp_table_and_output_split():
    s = torch.tensor([0.0, 1.0 / S_STEPS, -3.0 / S_STEPS, 0.49 / S_STEPS, S_MIN - 5, S_MAX + 5])
    want = [1.0, math.exp(1 / S_STEPS), math.exp(-3 / S_STEPS), 1.0, math.exp(S_MIN), math.exp(S_MAX)]
    assert exp_s(s).tolist() == want  # the table: exact, rounded to the 1/16 grid, clamped
    assert torch.allclose(exp_s(s[:3], differentiable=True), torch.tensor(want[:3], dtype=torch.float64))
    out = torch.arange(2 * 3 * 4.0).reshape(1, 6, 2, 2)
    eps, sig = split_output(out, 3)
    assert torch.equal(eps, out[:, :3]) and torch.equal(sig, out[:, 3:])
    assert split_output(out, 6)[1] is None
    with pytest.raises(ValueError, match="channels"):
        split_output(out, 4)


def test_unlearned_configs_keep_their_dict_and_ids(tiny_checkpoint):
    """Older checkpoints have no learn_sigma key: their configs, and so their model ids, are unchanged."""
    assert "learn_sigma" not in TINY.to_dict()
    wide = UNetConfig.from_dict({**TINY.to_dict(), "learn_sigma": True})
    assert wide.to_dict()["learn_sigma"] is True and UNetConfig.from_dict(TINY.to_dict()) == TINY
    ck = checkpoint.read(tiny_checkpoint)
    again = UNetConfig.from_dict(ck["net_config"]).to_dict()
    assert again == ck["net_config"]
    assert checkpoint.model_id(again, ck["schedule"], ck["ema"]) == checkpoint.load(tiny_checkpoint).model_id


def test_a_zero_head_is_the_calibrated_model(calibrated, tmp_path):
    """Widened with s = 0, a model's learned variance is its calibrated one: the same bound."""
    ck = checkpoint.read(calibrated.path)
    wide = UNetConfig.from_dict({**ck["net_config"], "learn_sigma": True})
    ck = {**{k: v for k, v in ck.items() if k not in ("format", "version")}, "net_config": wide.to_dict(),
          "ema": widen_for_sigma(ck["ema"], wide), "var_base": ck["calibration"]}
    checkpoint.save(tmp_path / "w.pt", ck)
    w = checkpoint.load(tmp_path / "w.pt")
    assert w.default_variance() is VarianceType.LEARNED and w.model_id != calibrated.model_id
    sched = w.chain(10)
    x0 = to_model_space(tiny_images(8, seed=2))
    a = bound_full(w.net, sched, x0, torch.Generator().manual_seed(0), w.variance(sched, VarianceType.LEARNED))
    b = bound_full(calibrated.net, sched, x0, torch.Generator().manual_seed(0),
                   calibrated.variance(sched, VarianceType.CALIBRATED))
    assert torch.allclose(a.total, b.total, rtol=1e-12, atol=1e-12)
    with pytest.raises(checkpoint.CheckpointError, match="does not learn"):
        calibrated.variance(sched, VarianceType.LEARNED)


def test_variance_term_is_the_bound_term_and_reaches_only_sigma():
    """The hybrid loss's term equals the bound's term of the drawn step (as `nll` computes it, for s on
    the table's grid) over P(t), and its gradient reaches s, not ε."""
    torch.manual_seed(0)
    cfg = UNetConfig.from_dict({**TINY.to_dict(), "learn_sigma": True})
    net = UNet(cfg)
    torch.nn.init.normal_(net.conv_out.weight, std=0.05)  # a non-zero head
    e = np.full(SCHED.T + 1, 0.02)
    e[0] = 0.0
    steps = (1, 3, 10, 40, 100)
    vl = VarianceLoss.build(SCHED, e, steps, weight=1.0)
    x0 = to_model_space(tiny_images(6, seed=1)).double()
    probs = torch.zeros(SCHED.T + 1, dtype=torch.float64)
    probs[list(steps)] = 0.2
    for k, t in enumerate(steps, start=1):
        tt = torch.full((6,), t, dtype=torch.int64)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        xt = q_sample(SCHED, x0, tt, noise)
        eps, s = split_output(net(xt.float(), tt.float()).double(), 1)
        s_grid = (torch.round(s * S_STEPS) / S_STEPS).detach().requires_grad_(True)
        eps_leaf = eps.detach().requires_grad_(True)
        loss = vl(x0, xt, tt, eps_leaf, s_grid, probs)
        loss.backward()
        assert eps_leaf.grad is None or torch.count_nonzero(eps_leaf.grad) == 0
        assert s_grid.grad is not None and torch.count_nonzero(s_grid.grad) > 0

        class Fixed(torch.nn.Module):  # the same outputs, as the bound's p_step sees them
            def forward(self, x, tstep):
                return torch.cat([eps.detach(), s_grid.detach()], 1)

        kk = torch.full((6,), k, dtype=torch.int64)
        want = step_term(Fixed(), vl.chain, x0, kk, noise, model_variance(vl.chain, VarianceType.LEARNED, e))
        want_bits = (want / (x0[0].numel() * LN2)).mean() / 0.2
        assert float(loss.detach()) == pytest.approx(float(want_bits), rel=1e-6, abs=1e-9), t


def test_learned_variance_trains_lowers_the_bound_and_codes_exactly(learned, calibrated):
    imgs = tiny_images(24, seed=4)
    x0 = to_model_space(imgs)
    sched = learned.chain(10)
    lv = learned.variance(sched, VarianceType.LEARNED)
    assert isinstance(lv, LearnedVariance) and learned.default_variance() is VarianceType.LEARNED
    a = bound_full(learned.net, sched, x0, torch.Generator().manual_seed(0), lv).total.mean().item()
    b = bound_full(learned.net, sched, x0, torch.Generator().manual_seed(0),  # the same network with s = 0
                   model_variance(sched, VarianceType.CALIBRATED, learned.var_base)).total.mean().item()
    assert a < b - 0.1, (a, b)  # squares on black: the background's variance shrinks (measured 6.06 vs 6.38)
    named = [(f"{i}", im) for i, im in enumerate(imgs)]
    res = encode_lossless(named, learned, steps=10, batch=8)
    assert info(res.data, learned)["variance"] == "learned"
    out = decode(res.data, learned)
    for (_, u), (_, v) in zip(named, out.images):
        np.testing.assert_array_equal(u, v)
    net = (8 * (len(res.data) - res.header_bytes) - res.initial_bits) / res.dims
    assert net == pytest.approx(a, rel=0.08), (net, a)


def test_lossy_files_of_a_learned_model_use_its_learned_variance(learned):
    """Version-4 files: one σ per dimension in the channel and the tail; exact at the end, and a
    file cut short decodes to its last whole step. Its theoretical rate is below the same
    chain's with the calibrated variance."""
    imgs = [(f"i{i}.png", im) for i, im in enumerate(tiny_images(3, seed=5))]
    res = encode_lossy(imgs, learned, steps=8, batch=4)
    assert res.data[4] == LOSSY_LEARNED_VERSION
    assert lossy_info(res.data, learned)["variance"] == "learned"
    dec = decode_lossy(res.data, learned)
    assert dec.exact
    for (_, a), (_, b) in zip(dec.images, imgs):
        assert np.array_equal(a, b)
    cut = decode_lossy(res.data[:len(res.data) - res.segments[-1].bytes - 2], learned)
    assert cut.truncated and not cut.exact and cut.step == res.segments[-2].step
    cal = encode_lossy(imgs, learned, steps=8, batch=4, var_type=VarianceType.CALIBRATED)
    assert cal.data[4] == LOSSY_PREDICTED_VERSION or cal.data[4] == 2
    assert decode_lossy(cal.data, learned).exact
    many = [(f"m{i}.png", im) for i, im in enumerate(tiny_images(24, seed=8))]
    lrn = sum(exact_chain_kl(many, learned, steps=8))
    assert lrn < sum(exact_chain_kl(many, learned, steps=8, var_type=VarianceType.CALIBRATED))
    # a learned file whose header claims version 3 is refused
    h, body, _ = unpack_segments(res.data)
    for key in ("_version", "payload_bytes"):
        h.pop(key)
    bad = pack_segments(h, body, LOSSY_PREDICTED_VERSION)
    with pytest.raises(FormatError, match="variance learned in a version-3"):
        decode_lossy(bad, learned)


def test_training_refusals(tmp_path, calibrated, learned):
    src = ArraySource("tiny", tiny_images())
    with pytest.raises(ValueError, match="t-sampling bound"):
        train(TrainConfig(data="tiny", steps=2, init=str(calibrated.path), learn_variance=True), TINY, SCHED, src,
              tmp_path / "a.pt", progress=False)
    with pytest.raises(checkpoint.CheckpointError, match="learns its variance"):
        train(TrainConfig(data="tiny", steps=2, init=str(learned.path)), TINY, SCHED, src, tmp_path / "b.pt",
              progress=False)
    # resuming a learned run continues it (its base and chain come from its own checkpoint)
    base = dict(data="tiny", batch_size=8, seed=4, warmup_steps=2, init=str(calibrated.path), t_sampling="bound",
                bound_steps=10, learn_variance=True)
    train(TrainConfig(**base, steps=3), TINY, SCHED, src, tmp_path / "r.pt", progress=False)
    train(TrainConfig(**base, steps=5), TINY, SCHED, src, tmp_path / "r.pt", progress=False)
    train(TrainConfig(**base, steps=5), TINY, SCHED, src, tmp_path / "u.pt", progress=False)
    r, u = checkpoint.read(tmp_path / "r.pt"), checkpoint.read(tmp_path / "u.pt")
    assert r["var_base"] == u["var_base"]
    assert r["var_base"]["x0_mse"] == checkpoint.read(calibrated.path)["calibration"]["x0_mse"]
    for name in u["ema"]:
        assert torch.equal(r["ema"][name], u["ema"][name]), name
