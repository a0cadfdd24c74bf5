"""The flip ensemble: the network's outputs averaged over flipped copies of its input, in the
bound and in both kinds of files (format versions 8 and 9)."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_images
from PIL import Image

from ddpm_codec import checkpoint
from ddpm_codec.cli.main import cli
from ddpm_codec.codec import decode, encode_lossless, info
from ddpm_codec.coding.container import (LOSSLESS_EVEN_VERSION, LOSSLESS_FLIPS_VERSION, LOSSY_EVEN_VERSION,
                                         LOSSY_FLIPS_VERSION, Container, FormatError, pack_segments, unpack_segments)
from ddpm_codec.diffusion import FlipEnsemble, ensemble
from ddpm_codec.lossy import Reconstruct, decode_lossy, encode_lossy, lossy_info


@pytest.fixture(scope="module")
def calibrated(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "cal.pt"
    return checkpoint.calibrate(tiny_checkpoint, tiny_images(16, seed=9), torch.Generator().manual_seed(0), "tiny",
                                out=out)


def ragged(seed=3):
    rng = np.random.default_rng(seed)
    return [("r.png", rng.integers(0, 256, (11, 17, 1), dtype=np.uint8))] + [
        (f"i{i}.png", im) for i, im in enumerate(tiny_images(3, seed=seed))]


def test_the_ensemble_averages_flipped_outputs_and_is_equivariant(calibrated):
    net = calibrated.net
    x = torch.randn(3, 1, 8, 12, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3.0, 50.0, 99.0])
    assert ensemble(net, "none") is net and ensemble(net, None) is net
    with torch.no_grad():
        plain = net(x, t)
        h = FlipEnsemble(net, "h")
        out = h(x, t)
        np.testing.assert_allclose(out, (plain + torch.flip(net(torch.flip(x, (3,)), t), (3,))) / 2, rtol=0, atol=0)
        assert not torch.equal(out, plain)
        # mirroring the input mirrors the output exactly: the two terms of the mean just swap
        assert torch.equal(h(torch.flip(x, (3,)), t), torch.flip(out, (3,)))
        hv = FlipEnsemble(net, "hv")
        out4 = hv(x, t)
        for dims in ((3,), (2,), (2, 3)):  # four terms summed in another order: equal up to rounding
            np.testing.assert_allclose(hv(torch.flip(x, dims), t), torch.flip(out4, dims), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="flips"):
        FlipEnsemble(net, "v")


def test_lossless_files_with_flips_are_version_8_and_decode_exactly(calibrated):
    imgs = ragged()
    res = encode_lossless(imgs, calibrated, steps=6, flips="h")
    assert res.data[4] == LOSSLESS_FLIPS_VERSION and info(res.data)["flips"] == "h"
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(imgs, decode(res.data, calibrated).images))
    plain = encode_lossless(imgs, calibrated, steps=6)
    assert plain.data[4] == LOSSLESS_EVEN_VERSION and info(plain.data)["flips"] == "none"
    assert len(plain.data) != len(res.data)  # another network, another chain
    # aligned images without flips keep version 1; with flips they are version 8 all the same
    one = [("a.png", tiny_images(1)[0])]
    assert encode_lossless(one, calibrated, steps=4).data[4] == 1
    r8 = encode_lossless(one, calibrated, steps=4, flips="hv")
    assert r8.data[4] == LOSSLESS_FLIPS_VERSION
    np.testing.assert_array_equal(decode(r8.data, calibrated).images[0][1], one[0][1])
    # the header's flips and the version go together
    c = Container.from_bytes(res.data)
    version = c.header.pop("_version")
    with pytest.raises(FormatError, match="flips"):
        decode(Container(c.header, c.payload, LOSSLESS_EVEN_VERSION).to_bytes(), calibrated)
    for bad in ("v", None):
        h = dict(c.header, flips=bad) if bad else {k: v for k, v in c.header.items() if k != "flips"}
        with pytest.raises(FormatError, match="flips"):
            decode(Container(h, c.payload, version).to_bytes(), calibrated)


def test_lossy_files_with_flips_are_version_9_and_decode_at_every_step(calibrated):
    imgs = ragged(4)
    res = encode_lossy(imgs, calibrated, steps=8, batch=4, flips="h", record=True)
    assert res.data[4] == LOSSY_FLIPS_VERSION and lossy_info(res.data, calibrated)["flips"] == "h"
    dec = decode_lossy(res.data, calibrated)
    assert dec.exact and all(np.array_equal(a, b) for (_, a), (_, b) in zip(dec.images, imgs))
    k = len(res.segments) // 2
    for how in Reconstruct:
        d = decode_lossy(res.data, calibrated, upto_step=res.segments[k].step, reconstruct=how)
        assert not d.exact and [im.shape for _, im in d.images] == [im.shape for _, im in imgs]
    assert encode_lossy(imgs, calibrated, steps=8, batch=4).data[4] == LOSSY_EVEN_VERSION
    h, body, _ = unpack_segments(res.data)
    h.pop("_version")
    with pytest.raises(FormatError, match="flips"):
        decode_lossy(pack_segments(h, body, LOSSY_EVEN_VERSION), calibrated)
    with pytest.raises(FormatError, match="flips"):
        decode_lossy(pack_segments({k: v for k, v in h.items() if k != "flips"}, body, LOSSY_FLIPS_VERSION),
                     calibrated)


def test_a_model_file_may_name_its_default_flips(calibrated, tmp_path):
    m = checkpoint.export(calibrated.path, tmp_path / "f.pt", flips="h")
    assert m.flips == "h" and m.model_id == calibrated.model_id and calibrated.flips == "none"
    imgs = ragged(5)
    res = encode_lossless(imgs, m, steps=5)
    assert info(res.data)["flips"] == "h"
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(imgs, decode(res.data, calibrated).images))
    # a file without flips (as every file before them) decodes with the plain network, whatever the model's default
    plain = encode_lossless(imgs, m, steps=5, flips="none")
    assert plain.data[4] == LOSSLESS_EVEN_VERSION
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(imgs, decode(plain.data, m).images))
    lossy = encode_lossy(imgs, calibrated, steps=5)
    assert lossy.data[4] == LOSSY_EVEN_VERSION and decode_lossy(lossy.data, m).exact
    ck = torch.load(tmp_path / "f.pt", weights_only=False)
    ck["flips"] = "x"
    torch.save(ck, tmp_path / "bad.pt")
    with pytest.raises(checkpoint.CheckpointError, match="flips"):
        checkpoint.load(tmp_path / "bad.pt")


def test_cli_flips(calibrated, tmp_path):
    run = CliRunner()
    p = tmp_path / "r.png"
    Image.fromarray(ragged(6)[0][1][..., 0]).save(p)
    m = str(calibrated.path)
    r = run.invoke(cli, ["encode", str(p), "--model", m, "--steps", "5", "--method", "bits-back", "--flips", "h",
                         "-o", str(tmp_path / "r.ddpm")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = run.invoke(cli, ["info", str(tmp_path / "r.ddpm"), "--model", m], catch_exceptions=False)
    assert r.exit_code == 0 and "version 8" in r.output and "flips h" in r.output, r.output
    r = run.invoke(cli, ["decode", str(tmp_path / "r.ddpm"), "--model", m, "-o", str(tmp_path / "o.png")],
                   catch_exceptions=False)
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o.png")), np.asarray(Image.open(p)))
    r = run.invoke(cli, ["encode", str(p), "--model", m, "--steps", "5", "--lossy", "--flips", "hv",
                         "-o", str(tmp_path / "l.ddpm")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = run.invoke(cli, ["info", str(tmp_path / "l.ddpm"), "--model", m], catch_exceptions=False)
    assert r.exit_code == 0 and "version 9" in r.output and "flips hv" in r.output, r.output
    r = run.invoke(cli, ["encode", str(p), "--model", m, "--flips", "x", "-o", str(tmp_path / "x.ddpm")])
    assert r.exit_code != 0 and "--flips" in r.output
    # the bound with and without the ensemble: both computed, they differ
    out = {}
    imgs = tiny_images(4, seed=7)
    for i, im in enumerate(imgs):
        Image.fromarray(im[..., 0]).save(tmp_path / f"t{i}.png")
    for f in ("none", "h"):
        r = run.invoke(cli, ["nll", *[str(tmp_path / f"t{i}.png") for i in range(4)], "--model", m, "--steps", "5",
                             "--json", "--flips", f], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        out[f] = json.loads(r.stdout)
    assert out["h"]["flips"] == "h" and out["none"]["flips"] == "none"
    assert out["h"]["bits_per_dim"] != out["none"]["bits_per_dim"]
