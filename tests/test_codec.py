import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ddpm_codec import checkpoint
from ddpm_codec.cli.main import cli
from ddpm_codec.codec import DecodeError, UnitLayout, decode, encode_lossless, info
from ddpm_codec.coding.container import LOSSLESS_EVEN_VERSION, LOSSLESS_TILED_VERSION, VERSION, Container, FormatError
from ddpm_codec.diffusion import VarianceType
from conftest import tiny_images


def run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return checkpoint.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def calibrated(tiny_checkpoint, tmp_path_factory):
    import torch

    out = tmp_path_factory.mktemp("cal") / "cal.pt"
    return checkpoint.calibrate(tiny_checkpoint, tiny_images(16, seed=9), torch.Generator().manual_seed(0), "tiny",
                                out=out)


def test_tiles_round_trip():
    im = np.random.default_rng(0).integers(0, 256, (19, 13, 3), dtype=np.uint8)
    padded = UnitLayout(8, 2, even=False)
    (u,) = padded.cut([im])  # one group: 3 × 2 tiles of 8, edges padded by repetition
    assert u.shape == (3 * 2, 3, 8, 8) and np.array_equal(u[-1, :, -1, -1], im[-1, -1])
    np.testing.assert_array_equal(padded.paste([u], [(19, 13)], 3)[0], im)


def test_even_layout_cuts_as_many_units_as_tiles_with_little_padding():
    from ddpm_codec.codec import UnitLayout, even_cuts, group_batches

    assert even_cuts(400, 32, 4) == [32] * 9 + [28] * 4 and even_cuts(600, 64, 4) == [60] * 10
    assert even_cuts(512, 32, 4) == [32] * 16 and even_cuts(5, 8, 2) == [6]
    for length in range(1, 200):
        for size, m in [(8, 2), (32, 4), (64, 4)]:
            cuts = even_cuts(length, size, m)
            assert len(cuts) == -(-length // size) and all(c % m == 0 and 0 < c <= size for c in cuts)
            assert 0 <= sum(cuts) - length < m and max(cuts) - min(cuts) <= m
    rng = np.random.default_rng(1)
    ims = [rng.integers(0, 256, hw + (3,), dtype=np.uint8) for hw in [(19, 13), (8, 8), (5, 17)]]
    lay = UnitLayout(8, 2, True)
    groups = lay.cut(ims)
    assert sum(len(g) for g in groups) == 6 + 1 + 3
    assert [g.shape[2:] for g in groups] == sorted({g.shape[2:] for g in groups}, reverse=True)
    for a, b in zip(lay.paste(groups, [im.shape[:2] for im in ims], 3), ims):
        np.testing.assert_array_equal(a, b)
    # batches never cross a group; the ramp counts values: after 8 small units, one large one
    sizes, spans = group_batches([np.zeros((8, 1, 4, 4)), np.zeros((3, 1, 8, 8)), np.zeros((30, 1, 8, 6))], 4)
    assert sizes[:9] == [1] * 9 and sum(sizes) == 41 and max(sizes) <= 4
    assert all(0 <= a < b <= [8, 3, 30][g] for g, a, b in spans) and spans[8] == (1, 0, 1)


@pytest.mark.parametrize("var", [VarianceType.FIXED_SMALL, VarianceType.CALIBRATED])
def test_archive_with_a_tiled_image_round_trips(calibrated, var):
    imgs = [(f"d{i}.png", im) for i, im in enumerate(tiny_images(5, seed=1))]
    big = np.random.default_rng(2).integers(0, 256, (11, 17, 1), dtype=np.uint8)
    imgs.append(("big.png", big))
    res = encode_lossless(imgs, calibrated, steps=20, var_type=var, batch=4)
    out = decode(res.data, calibrated)
    assert [n for n, _ in out.images] == [n for n, _ in imgs]
    for (_, a), (_, b) in zip(imgs, out.images):
        np.testing.assert_array_equal(a, b)
    assert 0 < res.initial_bits < 8 * len(res.data)
    i = info(res.data, calibrated)
    # 11×17 is cut into 2 × 3 units of 6×6 (version 6), not padded 8×8 tiles
    assert i["format_version"] == LOSSLESS_EVEN_VERSION and i["mode"] == "lossless" and len(i["steps"]) == 20
    assert i["K"] == 20
    assert i["spacing"] == "optimal" and info(res.data)["steps"] is None  # named, not listed, in the header
    assert i["model"] == calibrated.model_id and [m["name"] for m in i["images"]][-1] == "big.png"


def test_rate_approaches_the_bound_for_many_images(calibrated):
    """Coded bits (minus initial bits) against the bound of the same chain, on one batch chain."""
    import torch

    from ddpm_codec.data import to_model_space
    from ddpm_codec.likelihood import bound_full

    imgs = tiny_images(64, seed=4)
    res = encode_lossless([(f"{i}", im) for i, im in enumerate(imgs)], calibrated, steps=20,
                          var_type=VarianceType.CALIBRATED, batch=16)
    def bound(sched):
        return bound_full(calibrated.net, sched, to_model_space(imgs), torch.Generator().manual_seed(0),
                          calibrated.variance(sched, VarianceType.CALIBRATED)).total.mean().item()

    sched = calibrated.chain(20)  # the codec's chain: the steps of least expected bound
    assert info(res.data, calibrated)["steps"] == sched.steps
    b = bound(sched)
    net = (8 * (len(res.data) - res.header_bytes) - res.initial_bits) / res.dims
    assert net == pytest.approx(b, rel=0.05), (net, b)
    assert b < bound(calibrated.chain(20, "even"))  # chosen steps beat evenly spaced ones


def test_decoder_in_another_process_with_other_threads(calibrated, tmp_path):
    imgs = [(f"d{i}.png", im) for i, im in enumerate(tiny_images(3, seed=6))]
    import torch

    torch.set_num_threads(1)
    try:
        res = encode_lossless(imgs, calibrated, steps=10, batch=2)
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    f = tmp_path / "x.ddpm"
    f.write_bytes(res.data)
    r = subprocess.run([sys.executable, "-c", "from ddpm_codec.cli.main import main; main()", "--threads", "2", "decode", str(f),
                        "--model", str(calibrated.path), "-o", str(tmp_path / "out"), "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for name, im in imgs:
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / name))[..., None], im)


def test_tiles_larger_than_the_model_round_trip(model, tiny_checkpoint, tmp_path):
    """The U-Net is fully convolutional: a file may cut images into units of another multiple of
    its size (format version 5); the decoder reads the tile from the header. An image whose sides
    are not multiples of the tile is cut into units of even sides, not padded tiles (version 6)."""
    rng = np.random.default_rng(4)
    size = model.image_size
    imgs = [("big.png", rng.integers(0, 256, (2 * size, 6 * size, 1), dtype=np.uint8)),
            ("square.png", rng.integers(0, 256, (2 * size, 2 * size, 1), dtype=np.uint8))]
    res = encode_lossless(imgs, model, steps=5, tile=2 * size)
    assert res.data[4] == LOSSLESS_TILED_VERSION and info(res.data)["tile"] == 2 * size
    out = decode(res.data, model)
    for (_, a), (_, b) in zip(imgs, out.images):
        np.testing.assert_array_equal(a, b)
    assert info(res.data)["ramp"] == 0  # 3 units of 16: no ramp
    plain = encode_lossless(imgs, model, steps=5)  # 12 units of 8: the first two in quarters (version 6)
    assert plain.data[4] == LOSSLESS_EVEN_VERSION and info(plain.data)["tile"] == size
    assert info(plain.data)["ramp"] == 2
    for (_, a), (_, b) in zip(imgs, decode(plain.data, model).images):
        np.testing.assert_array_equal(a, b)
    flat = encode_lossless([("half.png", imgs[1][1][:size])], model, steps=5)  # 2 units of 8: no ramp
    assert flat.data[4] == 1 and info(flat.data)["ramp"] == 0
    assert len(res.data) != len(plain.data)  # other units, another chain: not the same file
    ragged = [("r.png", rng.integers(0, 256, (2 * size + 3, 3 * size - 1, 1), dtype=np.uint8)),
              ("small.png", tiny_images(1, seed=5)[0])] + imgs
    for tile in (None, 2 * size):
        even = encode_lossless(ragged, model, steps=5, tile=tile)
        assert even.data[4] == LOSSLESS_EVEN_VERSION and info(even.data)["tile"] == (tile or size)
        for (_, a), (_, b) in zip(ragged, decode(even.data, model).images):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="multiples of"):
        encode_lossless(imgs, model, steps=5, tile=size + 1)
    # a version-1 file claiming other tiles, or a version-5 file at the model's size, is refused
    c = Container.from_bytes(flat.data)
    c.header.pop("_version")
    with pytest.raises(FormatError, match="tile"):
        decode(Container(c.header, c.payload, LOSSLESS_TILED_VERSION).to_bytes(), model)
    # a version-6 file read as padded tiles (version 5) does not decode
    c = Container.from_bytes(even.data)
    c.header.pop("_version")
    with pytest.raises((DecodeError, FormatError)):
        decode(Container(c.header, c.payload, LOSSLESS_TILED_VERSION).to_bytes(), model)
    p = tmp_path / "big.png"
    Image.fromarray(ragged[0][1][..., 0]).save(p)
    r = run(["encode", str(p), "-o", str(tmp_path / "b.ddpm"), "--model", str(tiny_checkpoint), "--steps", "5",
             "--tile", str(size + 1)])
    assert r.exit_code != 0 and "multiples of" in r.output
    r = run(["encode", str(p), "-o", str(tmp_path / "b.ddpm"), "--model", str(tiny_checkpoint), "--steps", "5",
             "--tile", str(2 * size)])
    assert r.exit_code == 0, r.output
    r = run(["info", str(tmp_path / "b.ddpm"), "--model", str(tiny_checkpoint)])
    assert r.exit_code == 0 and "version 6" in r.output and "units of up to 16×16 (even sides, the first 2 in quarters)" in r.output, r.output
    r = run(["decode", str(tmp_path / "b.ddpm"), "-o", str(tmp_path / "r.png"), "--model", str(tiny_checkpoint)])
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "r.png")), ragged[0][1][..., 0])


def test_images_smaller_than_the_model_are_not_padded_to_its_size(model):
    """An archive of images that each fit in one unit is cut into the smallest units the network
    takes (multiples of 2 for the tiny model), in lossless and lossy files alike."""
    from ddpm_codec.codec import unit_size
    from ddpm_codec.lossy import decode_lossy, encode_lossy

    assert unit_size(model, [(5, 3), (2, 2)]) == 6 and unit_size(model, [(8, 8)]) == 8
    assert unit_size(model, [(11, 17), (2, 2)]) == 8 and unit_size(model, [(5, 3)], tile=8) == 8
    rng = np.random.default_rng(6)
    imgs = [("a.png", rng.integers(0, 256, (5, 3, 1), dtype=np.uint8)),
            ("b.png", rng.integers(0, 256, (4, 6, 1), dtype=np.uint8))]
    res = encode_lossless(imgs, model, steps=5)  # 5×3 in a 6×4 unit, 4×6 in 4×6: version 6
    assert info(res.data)["tile"] == 6 and res.data[4] == LOSSLESS_EVEN_VERSION
    for (_, a), (_, b) in zip(imgs, decode(res.data, model).images):
        np.testing.assert_array_equal(a, b)
    lossy = encode_lossy(imgs, model, steps=5)
    for (_, a), (_, b) in zip(imgs, decode_lossy(lossy.data, model).images):
        np.testing.assert_array_equal(a, b)


def test_a_model_file_may_name_its_default_tile(tiny_checkpoint, tmp_path):
    """export(tile=): the units larger images are cut into by default; not part of the model id."""
    m = checkpoint.export(tiny_checkpoint, tmp_path / "t.pt", tile=16)
    assert m.unit == 16 and m.image_size == 8 and m.model_id == checkpoint.load(tiny_checkpoint).model_id
    big = np.random.default_rng(8).integers(0, 256, (11, 17, 1), dtype=np.uint8)
    res = encode_lossless([("big.png", big)], m, steps=5)
    assert info(res.data)["tile"] == 16
    np.testing.assert_array_equal(decode(res.data, checkpoint.load(tiny_checkpoint)).images[0][1], big)
    import torch

    ck = torch.load(tmp_path / "t.pt", weights_only=False)
    ck["tile"] = 7
    torch.save(ck, tmp_path / "bad.pt")
    with pytest.raises(checkpoint.CheckpointError, match="tile"):
        checkpoint.load(tmp_path / "bad.pt")


def test_corrupt_files_are_refused(model):
    res = encode_lossless([("a.png", tiny_images(1)[0])], model, steps=5)
    data = res.data
    with pytest.raises(FormatError, match="empty"):
        decode(b"", model)
    with pytest.raises(FormatError, match="magic"):
        decode(b"GIF89a" + data[6:], model)
    with pytest.raises(FormatError, match="version"):
        decode(data[:4] + (VERSION + 1).to_bytes(2, "little") + data[6:], model)
    with pytest.raises(FormatError, match="truncated"):
        decode(data[:-9], model)
    with pytest.raises(FormatError, match="checksum"):
        decode(data[:-8] + bytes([data[-8] ^ 1]) + data[-7:], model)


def test_fuzzed_files_never_decode_wrong(model):
    """Random mutations: each is refused with a clear error or decodes to the original
    (a longer run: `ddpm-codec bench fuzz`)."""
    from ddpm_codec.eval.fuzz import fuzz

    orig = tiny_images(2, seed=3)
    res = encode_lossless([(f"{i}", im) for i, im in enumerate(orig)], model, steps=5)
    r = fuzz(res.data, list(orig), model, n=40)
    assert r["refused"] + r["decoded_exactly"] == 40 and r["refused"] > 30


def test_other_model_is_refused(model, calibrated):
    res = encode_lossless([("a.png", tiny_images(1)[0])], model, steps=5)
    with pytest.raises(DecodeError, match="made with model"):
        decode(res.data, calibrated)


def test_cli_round_trip_and_bad_input(tiny_checkpoint, tmp_path):
    for i, im in enumerate(tiny_images(2, seed=8)):
        Image.fromarray(im[..., 0]).save(tmp_path / f"d{i}.png")
    a = str(tmp_path / "a.ddpm")
    m = ["--model", str(tiny_checkpoint)]
    two = [str(tmp_path / "d0.png"), str(tmp_path / "d1.png")]
    r = run(["encode", *two, "-o", a, "--steps", "5", "--method", "bits-back", "--json", *m])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["method"] == "bits-back"
    assert out["bytes"] == os.path.getsize(a) and out["bits_per_dim"] == pytest.approx(8 * out["bytes"] / 128)
    assert 0 < out["initial_bits"] <= 8 * out["bytes"]
    i = json.loads(run(["info", a, "--json"]).stdout)
    assert i["format_version"] == 1 and i["mode"] == "lossless" and len(i["steps"]) == 5
    r = run(["decode", a, "-o", str(tmp_path / "out"), "--json", *m])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["images"] == 2
    for n in ["d0.png", "d1.png"]:
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / n)), np.asarray(Image.open(tmp_path / n)))
    # the default (auto) codes so few pixels as a channel file run to its exact end: no initial bits
    c = str(tmp_path / "c.ddpm")
    r = run(["encode", *two, "-o", c, "--steps", "5", "--json", *m])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["method"] == "channel" and json.loads(r.stdout)["exact"]
    assert json.loads(run(["info", c, "--json", *m]).stdout)["lossless_tail"]
    r = run(["decode", c, "-o", str(tmp_path / "outc"), "--json", *m])
    assert r.exit_code == 0 and json.loads(r.stdout)["exact"], r.output
    for n in ["d0.png", "d1.png"]:
        assert np.array_equal(np.asarray(Image.open(tmp_path / "outc" / n)), np.asarray(Image.open(tmp_path / n)))
    for args in (["--method", "channel", "--grid-bits", "1"], ["--lossy", "--method", "bits-back"]):
        assert run(["encode", *two, "-o", str(tmp_path / "x.ddpm"), *args, *m]).exit_code == 2
    (tmp_path / "junk.ddpm").write_bytes(b"\x00" * 50)
    (tmp_path / "empty.ddpm").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "rgb.png")
    cases = [
        ["encode", str(tmp_path / "d0.png"), "-o", a, *m],  # exists, no --force
        ["encode", str(tmp_path / "text.png"), "-o", str(tmp_path / "t.ddpm"), *m],
        ["encode", str(tmp_path / "rgb.png"), "-o", str(tmp_path / "r.ddpm"), *m],
        ["encode", str(tmp_path / "d0.png"), "-o", str(tmp_path / "nodir" / "x.ddpm"), *m],
        ["decode", str(tmp_path / "junk.ddpm"), *m],
        ["decode", str(tmp_path / "empty.ddpm"), *m],
        ["decode", a, "-o", str(tmp_path / "out"), *m],  # outputs exist
        ["info", str(tmp_path / "junk.ddpm")],
        ["decode", a],  # the tiny model is not shipped
    ]
    for args in cases:
        r = run(args)
        assert r.exit_code == 2, (args, r.output)
        assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert not (tmp_path / "t.ddpm").exists() and not (tmp_path / "r.ddpm").exists()


def test_batch_ramp_pays_initial_bits_for_a_small_batch_only(model):
    from ddpm_codec.codec import batch_sizes, group_batches

    sizes = batch_sizes(2000, 100)
    assert group_batches([np.zeros((2000, 1, 8, 8), np.uint8)], 100)[0] == sizes
    assert sum(sizes) == 2000 and sizes[0] == 1 and max(sizes) == 100
    assert all(b >= a for a, b in zip(sizes, sizes[1:-1]))
    imgs = [(f"{i}", im) for i, im in enumerate(tiny_images(40, seed=11))]
    ramp = encode_lossless(imgs, model, steps=5, batch=16)
    flat = encode_lossless(imgs, model, steps=5, batch=16, first_batch=16)
    assert ramp.initial_bits < 0.5 * flat.initial_bits
    # the first batches repeat one unit until the stack carries more: about one unit's dip in all
    alone = encode_lossless(imgs[:1], model, steps=5, batch=16)
    assert sizes[:3] == [1, 1, 1] and ramp.initial_bits <= 1.5 * alone.initial_bits, (ramp.initial_bits, alone.initial_bits)
    assert [im for _, im in decode(ramp.data, model).images][-1].tobytes() == imgs[-1][1].tobytes()


def test_numbered_names_are_stored_as_a_pattern_and_restored(model):
    from ddpm_codec.coding.container import pack_names, read_header, unpack_names

    for names in (["00000.png", "00001.png", "00002.png"], ["f9.png", "f10.png", "f11.png"],
                  ["img-07.jpg", "img-08.jpg", "img-09.jpg"]):
        packed = pack_names(names)
        assert isinstance(packed, dict) and unpack_names(packed) == names
    for names in (["a.png", "b.png", "c.png"], ["f1.png", "f3.png", "f4.png"], ["x1", "x2"], ["1.png", "2.png", "3.PNG"]):
        assert pack_names(names) == names  # no pattern: the list as it is
    for bad in ({"prefix": "a"}, {"prefix": "", "start": -1, "count": 2, "width": 0, "suffix": ""}, "x", [1, 2]):
        with pytest.raises(FormatError):
            unpack_names(bad)
    imgs = [(f"frame{i:03d}.png", im) for i, im in enumerate(tiny_images(4, seed=3))]
    res = encode_lossless(imgs, model, steps=4)
    assert isinstance(read_header(res.data)["names"], dict)
    dec = decode(res.data, model)
    assert [n for n, _ in dec.images] == [n for n, _ in imgs]
    assert [r["name"] for r in info(res.data)["images"]] == [n for n, _ in imgs]


def test_bench_codes_ragged_images_in_the_files_units(model):
    """`bench codec` runs the same units and batches as the file: a ragged image round-trips and
    the network-alone timing covers every unit."""
    from ddpm_codec.eval.bench_codec import bench_images

    rng = np.random.default_rng(8)
    imgs = [("r.png", rng.integers(0, 256, (13, 11, 1), dtype=np.uint8))]
    counted = []

    class Bar:
        def __init__(self, desc, total):
            self.desc, self.total = desc, total

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def update(self, n=1):
            counted.append((self.desc, n))

    out = bench_images(model, imgs, 5, None, 1, 3, with_bound=False, bar=Bar)
    assert out["exact"] and out["tile"] == 8 and out["network_only_s"] > 0
    for phase in ("encode", "decode", "network alone"):
        # 13×11 in 2 × 2 units (8 or 6 a side), the first two in quarters
        assert sum(n for d, n in counted if d == phase) == 2 * 4 + 2
