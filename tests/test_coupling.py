"""Colour coupling: p_θ with each pixel's channels correlated, coded R, G given R, B given both
(``ddpm_codec.coupling``; lossless format version 10)."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from ddpm_codec import checkpoint, coupling
from ddpm_codec.cli.main import cli
from ddpm_codec.codec import DecodeError, decode, encode_lossless, info
from ddpm_codec.coding.container import (LOSSLESS_COUPLED_VERSION, LOSSLESS_EVEN_VERSION, Container, FormatError)
from ddpm_codec.data import ArraySource, to_model_space
from ddpm_codec.diffusion import VarianceType
from ddpm_codec.likelihood import bound_full, coupled_pixel_nll, discretized_gaussian_log_prob, normal_kl
from ddpm_codec.nets.unet import UNetConfig
from ddpm_codec.schedule import ScheduleKind, make_schedule
from ddpm_codec.train import TrainConfig, train

TINY_RGB = UNetConfig(in_channels=3, image_size=8, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                      attn_levels=(1,), groups=4)


def grey_in_rgb(n: int, seed: int = 0) -> np.ndarray:
    """8×8 colour images whose three channels are equal: a grey square of random brightness on a
    darker ground, plus a little noise shared by the channels: the x̂_0 errors of R, G and B are
    positively correlated (a tiny model trained briefly exploits little of it: ρ 0.05–0.4)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 8, 8, 1), dtype=np.float64)
    for i in range(n):
        y, x = rng.integers(0, 5, 2)
        out[i] = rng.integers(0, 60)
        out[i, y:y + 3, x:x + 3] = rng.integers(120, 256)
    out = np.clip(out + rng.normal(0, 6, out.shape), 0, 255).round().astype(np.uint8)
    return np.repeat(out, 3, axis=3)


@pytest.fixture(scope="module")
def coupled(tmp_path_factory):
    """A tiny colour model, trained a little and calibrated."""
    d = tmp_path_factory.mktemp("rgb")
    sched = make_schedule(ScheduleKind.LINEAR, 100)
    cfg = TrainConfig(data="grey-rgb", batch_size=16, steps=40, seed=0, warmup_steps=5, lr=2e-3)
    train(cfg, TINY_RGB, sched, ArraySource("grey-rgb", grey_in_rgb(64)), d / "m.pt", progress=False)
    return checkpoint.calibrate(d / "m.pt", grey_in_rgb(16, seed=1), torch.Generator().manual_seed(0), "grey-rgb",
                                out=d / "cal.pt")


def test_the_conditionals_are_those_of_the_joint_gaussian():
    rng = np.random.default_rng(0)
    for _ in range(20):
        A = rng.normal(size=(3, 3))
        S = A @ A.T + 0.3 * np.eye(3)
        sd = np.sqrt(np.diag(S))
        R = S / np.outer(sd, sd)
        r = (np.array([R[0, 1]]), np.array([R[0, 2]]), np.array([R[1, 2]]))
        mean = rng.normal(size=(1, 3))
        x = rng.normal(size=3)
        z = (x - mean[0]) / sd
        for c in range(3):
            m, s = coupling.conditional(c, mean[:, :, None], sd[None, :, None], r, [z[0:1, None], z[1:2, None]])
            if c == 0:
                want_m, want_v = mean[0, 0], S[0, 0]
            else:
                W = S[c, :c] @ np.linalg.inv(S[:c, :c])
                want_m = mean[0, c] + W @ (x[:c] - mean[0, :c])
                want_v = S[c, c] - W @ S[:c, c]
            np.testing.assert_allclose(m.reshape(-1), [want_m], rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(s.reshape(-1) ** 2, [want_v], rtol=1e-10, atol=1e-12)


def test_the_expected_kl_is_the_multivariate_kl():
    """The chain-rule KL of the bound equals KL(N(μ_q, v_q I) ‖ N(μ_p, Σ)) with Σ's off-diagonal
    ρ √(E_i E_j); and with ρ = 0 it is the factorised KL."""
    g = torch.Generator().manual_seed(0)
    B, H, W = 2, 3, 4
    mean = torch.randn(B, 3, H, W, generator=g, dtype=torch.float64)
    q_mean = mean + 0.3 * torch.randn(B, 3, H, W, generator=g, dtype=torch.float64)
    bt = 0.05
    err = 0.02 + torch.rand(B, 3, H, W, generator=g, dtype=torch.float64)
    var = bt + err
    q_var = torch.full((B, 1, 1, 1), bt, dtype=torch.float64)
    rho = (torch.tensor(0.6, dtype=torch.float64), torch.tensor(0.4, dtype=torch.float64),
           torch.tensor(0.5, dtype=torch.float64))
    got = coupling.expected_kl(q_mean, q_var, mean, var, err, rho)
    for b, i, j in [(0, 0, 0), (1, 2, 3), (0, 1, 2)]:
        S = torch.diag(var[b, :, i, j])
        for (c1, c2), r in zip(coupling.PAIRS, rho):
            S[c1, c2] = S[c2, c1] = r * torch.sqrt(err[b, c1, i, j] * err[b, c2, i, j])
        p = torch.distributions.MultivariateNormal(mean[b, :, i, j], S)
        q = torch.distributions.MultivariateNormal(q_mean[b, :, i, j], bt * torch.eye(3, dtype=torch.float64))
        assert float(got[b, i, j]) == pytest.approx(float(torch.distributions.kl_divergence(q, p)), rel=1e-9)
    zero = tuple(torch.tensor(0.0, dtype=torch.float64) for _ in range(3))
    plain = normal_kl(q_mean, q_var.expand_as(q_mean), mean, var).sum(1)
    torch.testing.assert_close(coupling.expected_kl(q_mean, q_var, mean, var, err, zero), plain, rtol=1e-12, atol=1e-12)
    x0 = torch.randint(0, 256, (B, 3, H, W), generator=g).double() * (2 / 255) - 1
    torch.testing.assert_close(coupled_pixel_nll(x0, mean, var, var, zero),
                               -discretized_gaussian_log_prob(x0, mean, var.sqrt()).sum(1), rtol=1e-12, atol=1e-12)


def test_stated_rho_is_checked_and_interpolated():
    rows = [[40, 37, 42], [60, 47, 64], [80, 60, 80], [100, 70, 100], [120, 80, 120], [140, 90, 130], [150, 100, 140]]
    t = coupling.table(rows, 1000)
    assert t.shape == (1001, 3) and np.all(t[0] == 0)
    np.testing.assert_array_equal(t[list(coupling.ANCHORS)] * 256, rows)
    np.testing.assert_array_equal(t[3] * 256, [70, 53.5, 72])  # linear between anchors 2 and 4
    np.testing.assert_array_equal(t[500], t[64])  # the last anchor's above it
    assert coupling.table(rows, 10).shape == (11, 3)
    for bad in (rows[:-1], [r + [0] for r in rows], [[256, 0, 0]] + rows[1:], [[250, 250, -250]] + rows[1:],
                [[0.5, 0, 0]] + rows[1:]):
        with pytest.raises(ValueError):
            coupling.check(bad)


def test_estimated_rho_is_a_correlation_of_the_errors(coupled):
    units = [grey_in_rgb(16, seed=2).transpose(0, 3, 1, 2)]
    rows = coupling.estimate(coupled.net, coupled.schedule, units, 8, torch.Generator().manual_seed(0))
    again = coupling.estimate(coupled.net, coupled.schedule, units, 16, torch.Generator().manual_seed(0))
    assert np.asarray(rows).shape == (7, 3) and all(type(v) is int for r in rows for v in r)
    assert np.mean(rows) > 0.1 * 256  # grey-in-RGB: the channels' errors move together
    assert np.abs(np.asarray(rows) - np.asarray(again)).max() <= 1  # batching changes float rounding only
    coupling.check(rows)


def test_coupling_lowers_the_bound_and_the_file_and_decodes_exactly(coupled, monkeypatch):
    imgs = grey_in_rgb(24, seed=5)
    named = [(f"{i}.png", im) for i, im in enumerate(imgs)]
    plain = encode_lossless(named, coupled, steps=10, batch=24)  # 4,608 values: not coupled by default
    res = encode_lossless(named, coupled, steps=10, batch=24, coupling=True)
    assert plain.data[4] != LOSSLESS_COUPLED_VERSION and res.data[4] == LOSSLESS_COUPLED_VERSION
    stated = info(res.data)["coupling"]
    assert info(plain.data)["coupling"] is None and np.asarray(stated).shape == (7, 3)
    for r in (plain, res):
        assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(named, decode(r.data, coupled).images))
    sched = coupled.chain(10)
    var = coupled.variance(sched, VarianceType.CALIBRATED)

    def bound(rho):
        return bound_full(coupled.net, sched, to_model_space(imgs), torch.Generator().manual_seed(0), var,
                          coupling=rho).total.mean().item()

    b_plain, b_coupled = bound(None), bound(coupling.table(stated, coupled.schedule.T))
    assert b_coupled < b_plain - 0.005, (b_coupled, b_plain)
    net = lambda r: (8 * (len(r.data) - r.header_bytes) - r.initial_bits) / r.dims  # noqa: E731
    assert net(res) == pytest.approx(b_coupled, rel=0.05) and net(plain) == pytest.approx(b_plain, rel=0.05)
    assert net(res) < net(plain)
    # ragged images through even units, with flips, still exact; coupled by default above MIN_DIMS
    monkeypatch.setattr(coupling, "MIN_DIMS", 400)
    rng = np.random.default_rng(2)
    big = [("r.png", np.repeat(rng.integers(0, 256, (11, 13, 1), dtype=np.uint8), 3, axis=2))]
    r = encode_lossless(big, coupled, steps=3, flips="h")
    assert r.data[4] == LOSSLESS_COUPLED_VERSION and info(r.data)["flips"] == "h"
    assert np.array_equal(decode(r.data, coupled).images[0][1], big[0][1])
    with pytest.raises(ValueError, match="3-channel"):
        encode_lossless(named, coupled, steps=10, var_type=VarianceType.FIXED_SMALL, coupling=True)


def test_coupled_headers_are_checked(coupled):
    imgs = [("a.png", grey_in_rgb(1, seed=7)[0])]
    res = encode_lossless(imgs, coupled, steps=6, coupling=True)
    c = Container.from_bytes(res.data)
    h = {k: v for k, v in c.header.items() if not k.startswith("_")}
    with pytest.raises(FormatError, match="coupling"):  # coupling in a version-6 file
        decode(Container(h, c.payload, LOSSLESS_EVEN_VERSION).to_bytes(), coupled)
    rows = h["coupling"]
    for bad in (None, "xyz", rows[:-1], [[0.5, 0, 0]] + rows[1:], [[255, 255, -255]] + rows[1:]):
        h2 = {k: v for k, v in h.items() if k != "coupling"}
        if bad is not None:
            h2["coupling"] = bad
        with pytest.raises(FormatError, match="coupling"):
            decode(Container(h2, c.payload, LOSSLESS_COUPLED_VERSION).to_bytes(), coupled)
    h2 = {**h, "coupling": [[r[0] + 1, r[1], r[2]] for r in rows]}  # another ρ: the pixels come out wrong
    with pytest.raises(DecodeError):
        decode(Container(h2, c.payload, LOSSLESS_COUPLED_VERSION).to_bytes(), coupled)


def test_cli_encode_info_decode_nll(coupled, tmp_path):
    runner = CliRunner()
    src = str(coupled.path)
    img = tmp_path / "x.png"
    Image.fromarray(grey_in_rgb(1, seed=9)[0]).save(img)
    r = runner.invoke(cli, ["encode", str(img), "--model", src, "--steps", "6", "--method", "bits-back", "--coupling"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "x.ddpm"
    assert out.read_bytes()[4] == LOSSLESS_COUPLED_VERSION
    r = runner.invoke(cli, ["info", str(out), "--model", src])
    assert r.exit_code == 0 and "colours coupled" in r.output, r.output
    out.rename(tmp_path / "y.ddpm")
    r = runner.invoke(cli, ["decode", str(tmp_path / "y.ddpm"), "--model", src, "-o", str(tmp_path / "back.png")])
    assert r.exit_code == 0, r.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "back.png")), np.asarray(Image.open(img)))
    for i in range(4):
        Image.fromarray(grey_in_rgb(1, seed=20 + i)[0]).save(tmp_path / f"t{i}.png")
    vals = {}
    for flag in ("--coupling", "--no-coupling"):
        r = runner.invoke(cli, ["nll", *[str(tmp_path / f"t{i}.png") for i in range(4)], "--model", src,
                                "--steps", "6", "--json", flag])
        assert r.exit_code == 0, r.output
        vals[flag] = json.loads(r.stdout)
    assert np.asarray(vals["--coupling"]["coupling"]).shape == (7, 3) and vals["--no-coupling"]["coupling"] is None
    assert vals["--coupling"]["bits_per_dim"] != vals["--no-coupling"]["bits_per_dim"]
    r = runner.invoke(cli, ["encode", str(img), "--model", src, "--lossy", "--coupling", "-o", str(tmp_path / "l.ddpm")])
    assert r.exit_code != 0 and "bits-back" in r.output
    r = runner.invoke(cli, ["encode", str(img), "--model", src, "--method", "bits-back", "--variance", "beta_tilde",
                            "--coupling", "-o", str(tmp_path / "b.ddpm")])
    assert r.exit_code == 2 and "--coupling: colour coupling needs" in r.output, r.output
