"""The file's own variance scale: p's x̂_0-error variance refitted per channel to the images a
file codes (``ddpm_codec.varscale``; lossless format version 11)."""
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from ddpm_codec import checkpoint, varscale
from ddpm_codec.cli.main import cli
from ddpm_codec.codec import DecodeError, decode, encode_lossless, info, measure_file
from ddpm_codec.coding.container import LOSSLESS_EVEN_VERSION, LOSSLESS_SCALED_VERSION, Container, FormatError
from ddpm_codec.data import ArraySource, to_model_space
from ddpm_codec.diffusion import VarianceType, net_timesteps, predict_x0, q_sample, split_output
from ddpm_codec.likelihood import bound_full, discretized_gaussian_log_prob
from ddpm_codec.nets.unet import UNetConfig
from ddpm_codec.schedule import ScheduleKind, make_schedule
from ddpm_codec.train import TrainConfig, train

TINY_RGB = UNetConfig(in_channels=3, image_size=8, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                      attn_levels=(1,), groups=4)


def squares(n: int, noise: float, seed: int = 0) -> np.ndarray:
    """8×8 colour images: a bright square on a dark ground, plus independent noise per channel."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 8, 8, 3), dtype=np.float64)
    for i in range(n):
        y, x = rng.integers(0, 5, 2)
        out[i] = rng.integers(0, 60, 3)
        out[i, y:y + 3, x:x + 3] = rng.integers(120, 256, 3)
    return np.clip(out + rng.normal(0, noise, out.shape), 0, 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny colour model trained briefly on clean squares, calibrated on them."""
    d = tmp_path_factory.mktemp("vs")
    sched = make_schedule(ScheduleKind.LINEAR, 100)
    cfg = TrainConfig(data="squares", batch_size=16, steps=40, seed=0, warmup_steps=5, lr=2e-3)
    train(cfg, TINY_RGB, sched, ArraySource("squares", squares(64, 2.0)), d / "m.pt", progress=False)
    return checkpoint.calibrate(d / "m.pt", squares(16, 2.0, seed=1), torch.Generator().manual_seed(0), "squares",
                                out=d / "cal.pt")


def test_stated_fit_is_checked_and_interpolated():
    rows = [[300, 256, 512, 0, 10, 100], [400, 300, 600, 20, 30, 40], [500, 350, 700, 0, 0, 0],
            [600, 400, 800, 1, 2, 3], [700, 450, 900, 0, 0, 0], [800, 500, 1000, 5, 5, 5], [900, 550, 1100, 0, 0, 0]]
    t = varscale.table(rows, 1000, 3)
    assert t.shape == (1001, 6)
    np.testing.assert_array_equal(t[list(varscale.ANCHORS), :3] * 256, np.asarray(rows)[:, :3])
    np.testing.assert_allclose(t[list(varscale.ANCHORS), 3:] / varscale.FLOOR_UNIT, np.asarray(rows)[:, 3:], rtol=1e-12)
    np.testing.assert_array_equal(t[3, :3] * 256, [450, 325, 650])  # linear between anchors 2 and 4
    np.testing.assert_allclose(t[3, 3:] / varscale.FLOOR_UNIT, [10, 15, 20], rtol=1e-12)
    np.testing.assert_array_equal(t[500], t[64])  # the last anchor's above it
    np.testing.assert_array_equal(t[0], t[1])
    assert varscale.table([[256, 0]] * 7, 10, 1).shape == (11, 2)
    for bad in (rows[:-1], [r[:3] for r in rows], [[15, 256, 256, 0, 0, 0]] + rows[1:],
                [[256, 256, 64 * 256 + 1, 0, 0, 0]] + rows[1:], [[256, 256, 256, -1, 0, 0]] + rows[1:],
                [[256, 256, 256, 0, 0, varscale.FLOOR_MAX + 1]] + rows[1:], [[1.5, 256, 256, 0, 0, 0]] + rows[1:]):
        with pytest.raises(ValueError):
            varscale.check(bad, 3)


def test_apply_refits_only_the_error_part():
    var = torch.tensor([[[[0.5]], [[0.9]]]], dtype=torch.float64)
    bt, coef = torch.tensor(0.25, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    fit = torch.tensor([2.0, 0.5, 0.0, 0.4], dtype=torch.float64).reshape(1, 4, 1, 1)
    np.testing.assert_allclose(varscale.apply(var, bt, coef, fit).reshape(-1).numpy(),
                               [0.25 + 2 * 0.25, 0.25 + 0.5 * 0.65 + 0.25 * 0.4])


def test_golden_finds_the_minimum():
    for target in (0.1, 1.0, 3.7, 50.0):
        got = varscale.golden(lambda v: (math.log(v) - math.log(target)) ** 2)
        assert got == pytest.approx(target, rel=1e-5)
    assert varscale.golden(lambda v: -v) == pytest.approx(varscale.V_MAX, rel=1e-5)  # clamped to the range
    assert varscale.golden(lambda x: (x - 0.3) ** 2, 0.0, 1.0, log=False) == pytest.approx(0.3, abs=1e-6)
    v, a = varscale.fit_pair(lambda v, a: (math.log(v) - math.log(2.0)) ** 2 + (a - 1e-4) ** 2 * 1e8)
    assert v == pytest.approx(2.0, rel=1e-4) and a == pytest.approx(1e-4, rel=1e-3)


def test_the_fit_minimises_the_decoder_term_and_sees_extra_noise(model):
    """On noisier images than the model's training data the fitted variance is larger; at t = 1
    the fitted (v, a) is as good as the best of a grid for the decoder term the file pays (the
    bound's L_0 at k = 1) on the same draw."""
    sched = model.chain(10)
    var_type = VarianceType.CALIBRATED

    def fit(imgs):
        _, rows = measure_file(model.net, model, sched, var_type, [imgs.transpose(0, 3, 1, 2)], 32, False, True)
        assert len(rows) == 1  # one fit for all
        return np.asarray(rows[0])

    clean, imgs = squares(32, 2.0, seed=3), squares(32, 20.0, seed=3)
    rows, rows_clean = fit(imgs), fit(clean)
    assert rows.shape == (7, 6), rows
    # noisier images: a larger variance, through the scale or the floor (in x̂_0 units at t = 1)
    e1 = model.error_table(VarianceType.CALIBRATED)[1]

    def spread(r):
        return r[:3] / 256 * e1 + r[3:] * varscale.FLOOR_UNIT
    assert np.all(spread(rows[0]) > 1.1 * spread(rows_clean[0])), (rows[0], rows_clean[0])

    # the decoder cost on the same draw the fit used (anchor t = 1 is the first draw of seed 0)
    x0 = to_model_space(imgs)
    g = torch.Generator().manual_seed(0)
    full = model.schedule
    k1 = torch.ones(len(x0), dtype=torch.int64)
    xt = q_sample(full, x0, k1, torch.randn(x0.shape, generator=g))
    with torch.no_grad():
        eps, _ = split_output(model.net(xt, net_timesteps(full, k1)), 3)
    xhat = predict_x0(full, xt, k1, eps).clamp(-1, 1).double()
    for c in range(3):
        def cost(v, a):
            return float(-discretized_gaussian_log_prob(x0[:, c].double(), xhat[:, c],
                                                        torch.sqrt(torch.tensor(v * e1 + a))).sum())
        fitted = cost(rows[0, c] / 256, rows[0, 3 + c] * varscale.FLOOR_UNIT)
        grid = min(cost(v, a) for v in np.exp(np.linspace(math.log(0.1), math.log(30), 60))
                   for a in np.linspace(0, 4, 41) ** 2 * (2 / 255) ** 2)
        assert fitted <= grid + 1e-3 * abs(grid), (c, rows[0], fitted, grid)


def test_a_fitted_scale_lowers_the_bound_and_the_file_and_decodes_exactly(model, monkeypatch):
    imgs = squares(24, 20.0, seed=5)
    named = [(f"{i}.png", im) for i, im in enumerate(imgs)]
    plain = encode_lossless(named, model, steps=10, batch=24)  # 4,608 values: not fitted by default
    res = encode_lossless(named, model, steps=10, batch=24, fit_variance=True)
    assert plain.data[4] != LOSSLESS_SCALED_VERSION and res.data[4] == LOSSLESS_SCALED_VERSION
    stated = info(res.data)["var_scale"]
    assert info(plain.data)["var_scale"] is None and np.asarray(stated).shape == (1, 7, 6)
    assert info(res.data)["var_scale_of"] == [0] * 24 and "var_scale_of" not in Container.from_bytes(res.data).header
    for r in (plain, res):
        assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(named, decode(r.data, model).images))
    sched = model.chain(10)
    var = model.variance(sched, VarianceType.CALIBRATED)

    def bound(scale):
        return bound_full(model.net, sched, to_model_space(imgs), torch.Generator().manual_seed(0), var,
                          scale=scale).total.mean().item()

    b_plain, b_fit = bound(None), bound(varscale.table(stated[0], model.schedule.T, 3))
    assert b_fit < b_plain - 0.005, (b_fit, b_plain)
    net = lambda r: (8 * (len(r.data) - r.header_bytes) - r.initial_bits) / r.dims  # noqa: E731
    assert net(res) == pytest.approx(b_fit, rel=0.05) and net(plain) == pytest.approx(b_plain, rel=0.05)
    # payloads are whole 32-bit words and the fit's gain on these 4,608 values is a few words at most:
    # on one 2-core machine the two files came out the same number of words
    assert net(res) <= net(plain)
    # with the coupling too, ragged units, flips: exact; fitted by default above MIN_DIMS
    monkeypatch.setattr(varscale, "MIN_DIMS", 400)
    rng = np.random.default_rng(2)
    big = [("r.png", rng.integers(0, 256, (11, 13, 3), dtype=np.uint8))]
    r = encode_lossless(big, model, steps=3, flips="h", coupling=True)
    assert r.data[4] == LOSSLESS_SCALED_VERSION and info(r.data)["flips"] == "h" and info(r.data)["coupling"]
    assert np.array_equal(decode(r.data, model).images[0][1], big[0][1])
    with pytest.raises(ValueError, match="calibrated or learned"):
        encode_lossless(named, model, steps=10, var_type=VarianceType.FIXED_SMALL, fit_variance=True)


def test_scaled_headers_are_checked(model):
    imgs = [("a.png", squares(1, 12.0, seed=7)[0])]
    res = encode_lossless(imgs, model, steps=6, fit_variance=True)
    c = Container.from_bytes(res.data)
    h = {k: v for k, v in c.header.items() if not k.startswith("_")}
    with pytest.raises(FormatError, match="var_scale"):  # var_scale in a version-6 file
        decode(Container(h, c.payload, LOSSLESS_EVEN_VERSION).to_bytes(), model)
    rows = h["var_scale"][0]
    for bad in (None, "xyz", [], [rows[:-1]], [[[1.5] + rows[0][1:]] + rows[1:]], [[[0] + rows[0][1:]] + rows[1:]],
                [[rows[0][:3] + [-1, 0, 0]] + rows[1:]], [[r[:3] for r in rows]], rows, [rows, rows]):
        h2 = {k: v for k, v in h.items() if k != "var_scale"}
        if bad is not None:
            h2["var_scale"] = bad
        with pytest.raises(FormatError, match="var_scale"):
            decode(Container(h2, c.payload, LOSSLESS_SCALED_VERSION).to_bytes(), model)
    for i in (0, 3):  # another scale or floor: the pixels come out wrong
        h2 = {**h, "var_scale": [[r[:i] + [r[i] + 40] + r[i + 1:] for r in rows]]}
        with pytest.raises(DecodeError):
            decode(Container(h2, c.payload, LOSSLESS_SCALED_VERSION).to_bytes(), model)


def test_cli_encode_info_decode_nll(model, tmp_path):
    runner = CliRunner()
    src = str(model.path)
    img = tmp_path / "x.png"
    Image.fromarray(squares(1, 12.0, seed=9)[0]).save(img)
    r = runner.invoke(cli, ["encode", str(img), "--model", src, "--steps", "6", "--method", "bits-back",
                            "--fit-variance"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "x.ddpm"
    assert out.read_bytes()[4] == LOSSLESS_SCALED_VERSION
    r = runner.invoke(cli, ["info", str(out), "--model", src])
    assert r.exit_code == 0 and "variance fitted" in r.output, r.output
    r = runner.invoke(cli, ["decode", str(out), "--model", src, "-o", str(tmp_path / "back.png")])
    assert r.exit_code == 0, r.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "back.png")), np.asarray(Image.open(img)))
    for i in range(4):
        Image.fromarray(squares(1, 12.0, seed=20 + i)[0]).save(tmp_path / f"t{i}.png")
    vals = {}
    for flag in ("--fit-variance", "--no-fit-variance"):
        r = runner.invoke(cli, ["nll", *[str(tmp_path / f"t{i}.png") for i in range(4)], "--model", src,
                                "--steps", "6", "--json", flag])
        assert r.exit_code == 0, r.output
        vals[flag] = json.loads(r.stdout)
    assert np.asarray(vals["--fit-variance"]["var_scale"]).shape == (1, 7, 6)
    assert vals["--no-fit-variance"]["var_scale"] is None
    assert vals["--fit-variance"]["bits_per_dim"] != vals["--no-fit-variance"]["bits_per_dim"]  # lower: above
    r = runner.invoke(cli, ["encode", str(img), "--model", src, "--lossy", "--fit-variance",
                            "-o", str(tmp_path / "l.ddpm")])
    assert r.exit_code != 0 and "bits-back" in r.output
    r = runner.invoke(cli, ["encode", str(img), "--model", src, "--method", "bits-back", "--variance", "beta_tilde",
                            "--fit-variance", "-o", str(tmp_path / "b.ddpm")])
    assert r.exit_code == 2 and "--fit-variance: a variance scale needs" in r.output, r.output


def test_assign_gives_large_images_their_own_fit(monkeypatch):
    monkeypatch.setattr(varscale, "MIN_DIMS", 100)
    assert varscale.assign([50]) == [0] and varscale.assign([500]) == [0]
    assert varscale.assign([50, 60, 70]) == [0, 0, 0]
    assert varscale.assign([500, 600]) == [0, 1]
    assert varscale.assign([500, 50, 600, 60]) == [1, 0, 2, 0]


def test_each_large_image_gets_its_own_fit(model, monkeypatch):
    """Two noisy images and a clean one, each of at least MIN_DIMS values: three fits, the
    noisy images' larger; exact, and the fits cannot be swapped."""
    monkeypatch.setattr(varscale, "MIN_DIMS", 300)
    def mosaic(noise, seed):  # 16×24: six 8×8 squares
        return squares(6, noise, seed).reshape(2, 3, 8, 8, 3).transpose(0, 2, 1, 3, 4).reshape(16, 24, 3)
    clean, noisy, small = mosaic(1.0, 4), [mosaic(40.0, 5), mosaic(40.0, 6)], squares(1, 10.0, 7)[0]
    named = [("n0.png", noisy[0]), ("c.png", clean), ("s.png", small), ("n1.png", noisy[1])]
    res = encode_lossless(named, model, steps=5, batch=3)
    i = info(res.data)
    assert res.data[4] == LOSSLESS_SCALED_VERSION and i["var_scale_of"] == [1, 2, 0, 3] and len(i["var_scale"]) == 4
    fits = np.asarray(i["var_scale"])
    e1 = model.error_table(VarianceType.CALIBRATED)[1]
    spread = fits[:, 0, :3] / 256 * e1 + fits[:, 0, 3:] * varscale.FLOOR_UNIT  # at t = 1
    assert spread[1].mean() > 1.2 * spread[2].mean() and spread[3].mean() > 1.2 * spread[2].mean(), fits[:, 0]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(named, decode(res.data, model).images))
    c = Container.from_bytes(res.data)
    h = {k: v for k, v in c.header.items() if not k.startswith("_")}
    h2 = {**h, "var_scale_of": [2, 1, 0, 3]}  # the clean image's fit for a noisy one: wrong pixels
    with pytest.raises(DecodeError):
        decode(Container(h2, c.payload, LOSSLESS_SCALED_VERSION).to_bytes(), model)
    for bad in ([1, 2, 0], [1, 2, 0, 4], [1, 2, 0, -1], None):
        h2 = {k: v for k, v in h.items() if k != "var_scale_of"}
        if bad is not None:
            h2["var_scale_of"] = bad
        with pytest.raises(FormatError, match="var_scale"):
            decode(Container(h2, c.payload, LOSSLESS_SCALED_VERSION).to_bytes(), model)
