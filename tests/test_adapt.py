"""The network adapted to the file: biases and normalisations fine-tuned on the file's images, their
rounded changes coded in the file (``ddpm_codec.adapt``; lossless format version 13)."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from ddpm_codec import adapt
from ddpm_codec.cli.main import cli
from ddpm_codec.codec import DecodeError, decode, encode_lossless, info
from ddpm_codec.coding.container import LOSSLESS_ADAPTED_VERSION, Container, FormatError
from ddpm_codec.coding.entropy import Stack
from ddpm_codec.data import to_model_space
from ddpm_codec.diffusion import l_simple
from ddpm_codec.nets.unet import UNet

from test_coupling import TINY_RGB, coupled, grey_in_rgb  # noqa: F401 (a fixture)


def _mosaic(n: int, seed: int) -> np.ndarray:
    """One 16×24 image made of n 8×8 tiles of ``grey_in_rgb``."""
    t = grey_in_rgb(n, seed=seed)
    return np.concatenate([np.concatenate(list(t[i:i + 3]), axis=1) for i in range(0, n, 3)], axis=0)


def test_groups_leave_out_only_parameters_that_change_nothing():
    """A block's time-projection bias adds to its first convolution's, its skip's bias to its second
    convolution's, and the key bias of attention is the same for every key: moving any of them
    equals moving the kept bias (or nothing), so they are not coded."""
    torch.manual_seed(0)
    net = UNet(TINY_RGB).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape))  # zero-initialised layers too
    names = {n for n, _ in adapt.groups(net)}
    assert not any(n.endswith((".temb.bias", ".skip.bias")) and n.count(".") > 2 for n in names)
    assert {"temb.0.bias", "norm_out.weight", "conv_out.bias", "conv_in.weight", "conv_out.weight"} <= names
    qkv = [s for n, s in adapt.groups(net) if n.endswith("qkv.bias")]
    c = qkv[0].stop
    assert qkv[:2] == [slice(0, c), slice(2 * c, 3 * c)]
    kept = sum(s.stop - s.start for _, s in adapt.groups(net))
    candidates = sum(p.numel() for n, p in net.named_parameters() if n.endswith("bias") or ".norm" in n
                     or n.startswith(("norm", "conv_in", "conv_out")))
    assert kept == adapt.count(net) < candidates
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3.0, 40.0])
    params = dict(net.named_parameters())
    block = next(n.rsplit(".", 2)[0] for n in params if n.endswith(".skip.bias"))

    def out_with(moves):
        with torch.no_grad():
            saved = {n: params[n].clone() for n, _, _ in moves}
            for n, sl, d in moves:
                params[n].view(-1)[sl] += d
            y = net(x, t)
            for n, v in saved.items():
                params[n].copy_(v)
        return y

    d = 0.05 * torch.arange(params[f"{block}.conv1.bias"].numel(), dtype=torch.float32)
    torch.testing.assert_close(out_with([(f"{block}.temb.bias", slice(None), d)]),
                               out_with([(f"{block}.conv1.bias", slice(None), d)]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_with([(f"{block}.skip.bias", slice(None), d)]),
                               out_with([(f"{block}.conv2.bias", slice(None), d)]), rtol=1e-5, atol=1e-6)
    qkv_name = next(n for n in params if n.endswith("qkv.bias"))
    plain = out_with([])
    torch.testing.assert_close(out_with([(qkv_name, slice(c, 2 * c), torch.full((c,), 0.3))]), plain,
                               rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out_with([(qkv_name, slice(0, c), torch.full((c,), 0.3))]), plain, atol=1e-4)


def test_changes_push_and_pop_exactly():
    rng = np.random.default_rng(0)
    ints = [rng.normal(0, s, n).round().astype(np.int64) for s, n in ((0.2, 5), (3.0, 40), (40.0, 17), (0, 3))]
    ints[2][3] = 5000  # an outlier beyond the range: escaped, still exact
    codes = adapt.std_codes(ints)
    assert codes[3] == adapt.MIN_STD_CODE and codes[2] > codes[1] > codes[0]
    seed = rng.integers(0, 2 ** 32, 16, dtype=np.uint32)
    stack = Stack(seed)
    adapt.push(stack, ints, codes)
    got = adapt.pop(stack, [len(d) for d in ints], codes)
    for a, b in zip(got, ints):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(stack.words(), seed)
    with pytest.raises(ValueError):
        adapt.pop(Stack(seed), [5], [adapt.MAX_STD_CODE + 1])


def test_adaptation_fits_the_images_it_is_given(coupled):
    """Fine-tuning on one image lowers the model's loss on that image's crops (same noise, same t)."""
    im = _mosaic(6, seed=5)
    changes = adapt.fit(coupled, [im], K=6, steps=60, lr=1e-2, seed=0)
    ints = adapt.quantize(changes)
    assert len(ints) == len(adapt.groups(coupled.net)) and sum(int(np.abs(d).sum()) for d in ints) > 0
    tuned = adapt.apply(coupled, ints)
    x0 = to_model_space(np.stack([im[y:y + 8, x:x + 8] for y in range(0, 9, 2) for x in range(0, 17, 2)]))

    def loss(m):
        with torch.no_grad():
            return float(np.mean([l_simple(m.net, m.schedule, x0, torch.Generator().manual_seed(s)).item()
                                  for s in range(20)]))

    assert loss(tuned) < 0.93 * loss(coupled)  # measured: 0.88
    # the shipped network is untouched; applying the same changes twice gives the same weights, bit for bit
    again = adapt.apply(coupled, ints)
    for (n, a), (_, b), (_, c) in zip(tuned.net.named_parameters(), again.net.named_parameters(),
                                      coupled.net.named_parameters()):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, c) for a, c in zip(tuned.net.parameters(), coupled.net.parameters()))


def test_adapted_file_round_trips(coupled):
    im = _mosaic(6, seed=7)
    res = encode_lossless([("m.png", im)], coupled, 6, batch=4, adapt=15, coupling=False, fit_variance=False,
                          spatial=False)
    c = Container.from_bytes(res.data)
    assert c.version == LOSSLESS_ADAPTED_VERSION
    stated = info(res.data)["adapt"]
    assert stated["steps"] == 15 and stated["grid"] == adapt.GRID_BITS
    assert len(stated["widths"]) == len(adapt.groups(coupled.net))
    assert 0 < res.adapt_bits < 8 * len(res.data) and res.adapt_seconds > 0
    out = decode(res.data, coupled)
    np.testing.assert_array_equal(out.images[0][1], im)
    # with everything else on (coupled colours, fitted variance, checkerboard) it still round-trips
    res2 = encode_lossless([("m.png", im)], coupled, 6, batch=4, adapt=5, coupling=True, fit_variance=True,
                           spatial=True)
    np.testing.assert_array_equal(decode(res2.data, coupled).images[0][1], im)
    # the adaptation names as many groups as the network has: a header that says otherwise is refused
    h = dict(c.header, adapt=dict(stated, widths=stated["widths"][:-1]))
    with pytest.raises((DecodeError, FormatError)):
        decode(Container(h, c.payload, c.version).to_bytes(), coupled)
    h = dict(c.header, adapt=dict(stated, grid=adapt.GRID_BITS + 1))
    with pytest.raises(FormatError):
        decode(Container(h, c.payload, c.version).to_bytes(), coupled)
    h = dict(c.header)
    h.pop("adapt")
    with pytest.raises(FormatError):
        decode(Container(h, c.payload, c.version).to_bytes(), coupled)


def test_cli_adapt(coupled, tmp_path):
    runner = CliRunner()
    src = str(coupled.path)
    img = tmp_path / "x.png"
    Image.fromarray(_mosaic(6, seed=9)).save(img)
    r = runner.invoke(cli, ["encode", str(img), "--model", src, "--steps", "6", "--adapt", "5"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "x.ddpm"
    assert out.read_bytes()[4] == LOSSLESS_ADAPTED_VERSION
    r = runner.invoke(cli, ["info", str(out), "--model", src])
    assert r.exit_code == 0 and "network adapted (5 steps" in r.output, r.output
    r = runner.invoke(cli, ["decode", str(out), "--model", src, "-o", str(tmp_path / "back.png")])
    assert r.exit_code == 0, r.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "back.png")), np.asarray(Image.open(img)))
    r = runner.invoke(cli, ["encode", str(img), "--model", src, "--lossy", "--adapt", "5", "-o",
                            str(tmp_path / "l.ddpm")])
    assert r.exit_code == 2 and "--adapt is for bits-back files" in r.output, r.output
