"""The checkerboard decoder: L_0's pixels in two phases, the second given the first's residuals
(``ddpm_codec.spatial``; lossless format version 12)."""
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from ddpm_codec import spatial
from ddpm_codec.cli.main import cli
from ddpm_codec.codec import DecodeError, decode, encode_lossless, info
from ddpm_codec.coding.bitsback import ChainCoder
from ddpm_codec.coding.container import LOSSLESS_SCALED_VERSION, LOSSLESS_SPLIT_VERSION, Container, FormatError
from ddpm_codec.coding.entropy import Stack
from ddpm_codec.coupling import table as rho_table
from ddpm_codec.diffusion import VarianceType, model_variance
from ddpm_codec.likelihood import LN2, bound_full, discretized_gaussian_log_prob, split_pixel_nll
from ddpm_codec.schedule import ScheduleKind, make_schedule

from test_coupling import coupled, grey_in_rgb  # noqa: F401 (a fixture)


def test_neighbour_mean_is_the_mean_of_the_in_unit_neighbours():
    rng = np.random.default_rng(0)
    u = rng.normal(size=(2, 3, 5, 7))
    got = spatial.neighbour_mean(u)
    for b, c, y, x in [(0, 0, 0, 0), (1, 2, 4, 6), (0, 1, 2, 3), (1, 0, 0, 3), (0, 2, 4, 0)]:
        nb = [u[b, c, y + dy, x + dx] for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))
              if 0 <= y + dy < 5 and 0 <= x + dx < 7]
        assert got[b, c, y, x] == pytest.approx(np.mean(nb), rel=1e-12)
    np.testing.assert_array_equal(spatial.neighbour_mean(torch.from_numpy(u)).numpy(), got)  # numpy = torch, bit for bit
    b = spatial.phase_b(5, 7)
    assert b.sum() == 17 and not b[0, 0] and b[0, 1]  # (row + column) odd
    # a phase-B pixel's mean never sees a phase-B value
    v = u.copy()
    v[..., b] = 1e6
    np.testing.assert_array_equal(spatial.neighbour_mean(v)[..., b], got[..., b])


def test_stated_weights_are_checked():
    assert spatial.check([102, 0, 512, 256, 16, 200], 3).tolist() == [102, 0, 512, 256, 16, 200]
    w, f = spatial.weights([128, 64, 0, 256, 128, 64], 3)
    np.testing.assert_array_equal(w, [0.5, 0.25, 0.0])
    np.testing.assert_array_equal(f, [1.0, 0.5, 0.25])
    for bad in ([1, 2, 3], [-1, 0, 0, 256, 256, 256], [0, 0, 513, 256, 256, 256], [0, 0, 0, 256, 15, 256],
                [0, 0, 0, 257, 256, 256], [0.5, 0, 0, 256, 256, 256]):
        with pytest.raises(ValueError):
            spatial.check(bad, 3)


@pytest.mark.parametrize("coupled_rho", [None, (0.3, 0.2, 0.4)])
def test_split_decoder_push_pop_and_its_cost_is_the_bound_term(coupled_rho):
    """Push then pop returns the pixels and leaves the stack as it was; the bits the push adds
    are the bound's −log2 p of the split decoder (``likelihood.split_pixel_nll``)."""
    g = torch.Generator().manual_seed(1)
    B, C, H, W = 3, 3, 16, 12
    sched = make_schedule(ScheduleKind.LINEAR, 100)
    # images with smooth structure the "network" misses: the residuals are correlated in space
    base = torch.rand(B, C, 1, 1, generator=g, dtype=torch.float64) * 1.6 - 0.8
    smooth = torch.nn.functional.avg_pool2d(torch.randn(B, C, H + 4, W + 4, generator=g, dtype=torch.float64), 5, 1)
    u8 = ((base + 0.08 * smooth + 0.01 * torch.randn(B, C, H, W, generator=g, dtype=torch.float64)).clamp(-1, 1)
          + 1) * 127.5
    u = u8.round().to(torch.int64)
    x0 = u.double() * (2 / 255) - 1
    mean = base.expand(B, C, H, W).contiguous()
    var = torch.full((B, C, H, W), 0.04 ** 2, dtype=torch.float64) * (0.5 + torch.rand(B, C, H, W, generator=g,
                                                                                       dtype=torch.float64))
    stated = [110, 90, 120, 200, 230, 240]
    rho = None if coupled_rho is None else rho_table([list(map(lambda v: round(v * 256), coupled_rho))] * 7, 100)
    coder = ChainCoder(None, sched, np.full(101, 1e-3), 1, rho, None, stated)
    seed = np.random.default_rng(0).integers(0, 2 ** 32, 64, dtype=np.uint32)
    stack = Stack(seed)
    before = stack.bits()
    coder._push_split(stack, u.numpy().reshape(-1), mean.numpy().reshape(-1), var.numpy().reshape(-1), (B, C, H, W))
    pushed = stack.bits() - before
    got = coder._pop_split(stack, mean.numpy().reshape(-1), var.numpy().reshape(-1), (B, C, H, W))
    np.testing.assert_array_equal(got, u.numpy().reshape(-1))
    np.testing.assert_array_equal(stack.words(), seed)
    bt = torch.zeros(B, 1, 1, 1, dtype=torch.float64)  # β̃_1 = 0: p's variance is all error
    r = None if coupled_rho is None else tuple(torch.tensor(v, dtype=torch.float64).reshape(1, 1, 1)
                                               for v in rho[1])
    bits = float(split_pixel_nll(x0, mean, var, bt, r, stated).sum()) / LN2
    assert pushed == pytest.approx(bits, rel=0.01, abs=64)
    # the split pays less than the plain decoder on such images; w = 0, f = 1 is the plain decoder
    plain_stated = [0, 0, 0, 256, 256, 256]
    plain = float(split_pixel_nll(x0, mean, var, bt, r, plain_stated).sum()) / LN2
    if coupled_rho is None:
        assert plain == pytest.approx(float(-discretized_gaussian_log_prob(x0, mean, var.sqrt()).sum()) / LN2, rel=1e-12)
    assert bits < plain - 0.02 * x0.numel()


def test_split_lowers_the_bound_and_the_file_and_decodes_exactly(coupled, monkeypatch):
    imgs = grey_in_rgb(24, seed=5)
    named = [(f"{i}.png", im) for i, im in enumerate(imgs)]
    base = encode_lossless(named, coupled, steps=10, batch=24, coupling=True, fit_variance=True)
    res = encode_lossless(named, coupled, steps=10, batch=24, coupling=True, fit_variance=True, spatial=True)
    assert base.data[4] == LOSSLESS_SCALED_VERSION and res.data[4] == LOSSLESS_SPLIT_VERSION
    stated = info(res.data)["spatial"]
    assert info(base.data)["spatial"] is None and len(stated) == 6
    for r in (base, res):
        assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(named, decode(r.data, coupled).images))
    # without coupling or a fit, and for several unit shapes (even cuts) with flips: still exact
    rng = np.random.default_rng(2)
    ragged = [("r.png", np.repeat(rng.integers(0, 256, (11, 13, 1), dtype=np.uint8), 3, axis=2)), named[0]]
    r = encode_lossless(ragged, coupled, steps=3, flips="h", coupling=False, fit_variance=False, spatial=True)
    assert r.data[4] == LOSSLESS_SPLIT_VERSION and info(r.data)["coupling"] is None
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(ragged, decode(r.data, coupled).images))
    # the default: split where coupled, above MIN_DIMS
    monkeypatch.setattr(spatial, "MIN_DIMS", 400)
    from ddpm_codec import coupling, varscale
    monkeypatch.setattr(coupling, "MIN_DIMS", 400)
    monkeypatch.setattr(varscale, "MIN_DIMS", 400)
    assert encode_lossless(named[:4], coupled, steps=3).data[4] == LOSSLESS_SPLIT_VERSION
    with pytest.raises(ValueError, match="calibrated or learned"):
        encode_lossless(named, coupled, steps=3, var_type=VarianceType.FIXED_SMALL, spatial=True)


def test_the_encoders_fit_lowers_the_bound(coupled):
    """nll with and without the split, same noise: the fitted weights never raise the bound (the
    fit states the plain decoder when it finds no gain) and the decoder term is the only one that moves."""
    from ddpm_codec.eval.nll import dataset_nll

    imgs = grey_in_rgb(32, seed=11)
    sched = coupled.chain(10)
    res = {sp: dataset_nll(coupled, imgs, sched, torch.Generator().manual_seed(0), var_type=VarianceType.CALIBRATED,
                           progress=False, coupling=True, fit_variance=False, spatial=sp) for sp in (False, True)}
    assert res[False].spatial is None and len(res[True].spatial) == 6
    assert res[True].terms["decoder"] <= res[False].terms["decoder"] + 1e-12
    assert res[True].terms["diffusion"] == pytest.approx(res[False].terms["diffusion"], rel=1e-12)


def test_split_headers_are_checked(coupled):
    imgs = [("a.png", grey_in_rgb(1, seed=7)[0])]
    res = encode_lossless(imgs, coupled, steps=6, coupling=True, spatial=True)
    c = Container.from_bytes(res.data)
    h = {k: v for k, v in c.header.items() if not k.startswith("_")}
    with pytest.raises(FormatError, match="spatial"):  # spatial in a version-11 file
        decode(Container({**h, "var_scale": [[[256] * 3 + [0] * 3] * 7]}, c.payload,
                         LOSSLESS_SCALED_VERSION).to_bytes(), coupled)
    for bad in (None, "xyz", h["spatial"][:-1], [0.5] + h["spatial"][1:], [600] + h["spatial"][1:]):
        h2 = {k: v for k, v in h.items() if k != "spatial"}
        if bad is not None:
            h2["spatial"] = bad
        with pytest.raises(FormatError, match="spatial"):
            decode(Container(h2, c.payload, LOSSLESS_SPLIT_VERSION).to_bytes(), coupled)
    other = [v + 13 if i < 3 else v for i, v in enumerate(h["spatial"])]  # other weights: wrong pixels, refused
    with pytest.raises(DecodeError):
        decode(Container({**h, "spatial": other}, c.payload, LOSSLESS_SPLIT_VERSION).to_bytes(), coupled)


def test_cli_spatial(coupled, tmp_path):
    runner = CliRunner()
    src = str(coupled.path)
    img = tmp_path / "x.png"
    Image.fromarray(grey_in_rgb(1, seed=9)[0]).save(img)
    r = runner.invoke(cli, ["encode", str(img), "--model", src, "--steps", "6", "--method", "bits-back", "--spatial"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "x.ddpm"
    assert out.read_bytes()[4] == LOSSLESS_SPLIT_VERSION
    r = runner.invoke(cli, ["info", str(out), "--model", src])
    assert r.exit_code == 0 and "checkerboard decoder" in r.output, r.output
    r = runner.invoke(cli, ["decode", str(out), "--model", src, "-o", str(tmp_path / "back.png")])
    assert r.exit_code == 0, r.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "back.png")), np.asarray(Image.open(img)))
    r = runner.invoke(cli, ["encode", str(img), "--model", src, "--lossy", "--spatial", "-o", str(tmp_path / "l.ddpm")])
    assert r.exit_code == 2 and "bits-back" in r.output
    r = runner.invoke(cli, ["encode", str(img), "--model", src, "--method", "bits-back", "--variance", "beta_tilde",
                            "--spatial", "-o", str(tmp_path / "b.ddpm")])
    assert r.exit_code == 2 and "--spatial: a checkerboard decoder needs" in r.output, r.output
