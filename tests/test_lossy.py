import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_images
from PIL import Image

from ddpm_codec import checkpoint
from ddpm_codec.cli.main import cli
from ddpm_codec.codec import DecodeError
from ddpm_codec.coding.channel import StepChannel, balanced_chunks, kl_bits, pack_indices, unpack_indices
from ddpm_codec.coding.container import FormatError
from ddpm_codec.lossy import Reconstruct, decode_lossy, encode_lossy, exact_chain_kl, lossy_info


@pytest.fixture(scope="module")
def calibrated(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "cal.pt"
    return checkpoint.calibrate(tiny_checkpoint, tiny_images(16, seed=9), torch.Generator().manual_seed(0), "tiny",
                                out=out)


def named(n, seed=5):
    return [(f"i{i}.png", im) for i, im in enumerate(tiny_images(n, seed=seed))]


@pytest.fixture(scope="module")
def full(calibrated):
    imgs = named(12)
    return imgs, encode_lossy(imgs, calibrated, steps=20, batch=5, record=True)


def test_index_packing_round_trips():
    rng = np.random.default_rng(0)
    for bits in (1, 7, 8, 11, 16):
        idx = rng.integers(0, 1 << bits, 37)
        data = pack_indices(idx, bits)
        assert len(data) == math.ceil(37 * bits / 8)
        assert np.array_equal(unpack_indices(data, 37, bits), idx)


@pytest.mark.parametrize("layout,bits,kpc", [("rows", 8, 6.0), ("window", 14, 12.0)])
def test_channel_decodes_the_encoders_sample_and_tracks_q(layout, bits, kpc):
    rng = np.random.default_rng(1)
    D = 4000
    mu_p = rng.normal(size=D)
    mu_q = mu_p + 0.3 * rng.normal(size=D)
    s_p, s_q = 1.0, 0.8
    kl = float(kl_bits(mu_q, s_q, mu_p, s_p).sum())
    ch = StepChannel(seed=3, step=2, index_bits=bits, layout=layout, workers=2)
    n = round(kl / kpc)
    idx, x = ch.encode(mu_q, s_q, mu_p, s_p, n)
    assert idx.shape == (n,) and idx.min() >= 0 and idx.max() < 1 << bits
    assert np.array_equal(ch.decode(idx, mu_p, s_p), x)  # bit-identical on the receiver's side
    # the sample carries most of q's offset from p (MRC's approximation: not all of it)
    d = mu_q - mu_p
    slope = float((x - mu_p) @ d / (d @ d))
    assert 0.6 < slope < 1.1
    z = (x - mu_q) / s_q
    assert abs(z.mean()) < 0.1 and 0.8 < z.var() < 1.3
    # a sample from p with no chunks: both sides draw the same one
    assert np.array_equal(ch.encode(mu_q, s_q, mu_p, s_p, 0)[1], ch.decode(np.zeros(0, np.int64), mu_p, s_p))


def test_balanced_chunks_partition_the_dims_and_even_out_a_skewed_weight():
    rng = np.random.default_rng(2)
    D, n = 5000, 37
    weight = rng.pareto(1.5, D)  # heavy-tailed, like the KL of a step's pixels
    order = rng.permutation(D)
    chunks = balanced_chunks(order, weight, n)
    assert len(chunks) == n
    assert np.array_equal(np.sort(np.concatenate(chunks)), np.arange(D))  # every dimension once
    assert max(c.size for c in chunks) - min(c.size for c in chunks) <= 1
    bal = np.array([weight[c].sum() for c in chunks])
    rnd = np.array([weight[c].sum() for c in np.array_split(order, n)])
    assert bal.std() < 0.5 * rnd.std()
    assert [c.tolist() for c in balanced_chunks(order, weight, n)] == [c.tolist() for c in chunks]


def test_channel_with_a_sigma_per_dimension():
    """A learned variance: p's σ differs per dimension; the window scores (two correlations) pick
    the largest importance weight, and the receiver rebuilds x from the same σ and chunks."""
    from ddpm_codec.coding.channel import _stream

    rng = np.random.default_rng(6)
    d = 250
    mu_p = rng.normal(size=d)
    s_p = np.exp(rng.uniform(-0.2, 1.0, d)) * 0.5
    s_q = 0.45
    mu_q = mu_p + 0.4 * s_p * rng.normal(size=d)
    ch = StepChannel(seed=9, step=3, index_bits=12, layout="window")
    w = np.log(s_p**2 / s_q**2)
    idx, x = ch.encode(mu_q, s_q, mu_p, s_p, 1, w)
    dims = ch._chunks(d, 1, w)[0]
    z = _stream(9, 3, 0).standard_normal(4096 + d - 1, dtype=np.float32).astype(np.float64)
    win = np.lib.stride_tricks.sliding_window_view(z, d)[:4096]
    xs = mu_p[dims] + s_p[dims] * win
    logw = (-0.5 * ((xs - mu_q[dims]) / s_q) ** 2 + 0.5 * win**2).sum(1)
    assert int(idx[0]) == int(np.argmax(logw))
    assert np.allclose(x[dims], xs[idx[0]])
    assert np.array_equal(ch.decode(idx, mu_p, s_p, w), x)
    # many chunks: the sample follows q's offset from p and its spread around μ_q
    D = 6000
    mu_p = rng.normal(size=D)
    s_p = np.exp(rng.uniform(-0.3, 0.3, D))
    mu_q = mu_p + 0.3 * s_p * rng.normal(size=D)
    s_q = 0.8
    n = round(float(kl_bits(mu_q, s_q, mu_p, s_p).sum()) / 12)
    idx, x = ch.encode(mu_q, s_q, mu_p, s_p, n, np.log(s_p))
    assert np.array_equal(ch.decode(idx, mu_p, s_p, np.log(s_p)), x)
    dq = mu_q - mu_p
    assert 0.6 < float((x - mu_p) @ dq / (dq @ dq)) < 1.1
    zq = (x - mu_q) / s_q
    assert abs(zq.mean()) < 0.1 and 0.7 < zq.var() < 1.4
    with pytest.raises(ValueError, match="window"):
        StepChannel(seed=1, step=1, index_bits=8, layout="rows").encode(mu_q, s_q, mu_p, s_p, 3)


def test_window_candidates_are_windows_of_one_draw_and_near_q():
    """Window layout: candidate i of a chunk of d dims is z[i : i + d] of one stream; its log
    weight computed by FFT matches the direct one, so the pick is the largest weight."""
    from ddpm_codec.coding.channel import _stream

    rng = np.random.default_rng(4)
    d = 300
    mu_p = np.zeros(d)
    mu_q = 0.25 * rng.normal(size=d)
    s_p, s_q = 1.0, 0.9
    ch = StepChannel(seed=11, step=5, index_bits=10, layout="window")
    idx, x = ch.encode(mu_q, s_q, mu_p, s_p, 1)
    order = ch._chunks(d, 1)[0]
    z = _stream(11, 5, 0).standard_normal(1024 + d - 1, dtype=np.float32).astype(np.float64)
    win = np.lib.stride_tricks.sliding_window_view(z, d)[:1024]
    logw = (-0.5 * ((win - mu_q[order]) / s_q) ** 2 + 0.5 * win**2).sum(1)
    assert int(idx[0]) == int(np.argmax(logw))
    assert np.allclose(x[order], win[idx[0]])
    assert np.array_equal(ch.decode(idx, mu_p, s_p), x)


def test_full_file_decodes_exactly_and_every_step_matches(full, calibrated):
    imgs, res = full
    assert res.complete and res.segments[-1].step == 0 and len(res.segments) == 21
    dec = decode_lossy(res.data, calibrated)
    assert dec.exact and not dec.truncated and dec.step == 0
    for (_, a), (_, b) in zip(dec.images, imgs):
        assert np.array_equal(a, b)
    assert dec.bits_per_dim == pytest.approx(res.bits_per_dim)
    # the receiver's reconstruction at a middle step is the encoder's recorded one
    mid = len(res.segments) // 2
    d = decode_lossy(res.data, calibrated, upto_step=res.segments[mid].step)
    assert d.step == res.segments[mid].step and not d.exact
    rec = np.concatenate([im[None] for _, im in d.images]).transpose(0, 3, 1, 2)
    assert np.array_equal(rec.reshape(-1), res.recon[mid])  # (recorded flat, over the file's units)


def test_rate_grows_and_distortion_falls_over_the_chain(full):
    imgs, res = full
    x = np.concatenate([im[None] for _, im in imgs]).transpose(0, 3, 1, 2).astype(float).reshape(-1)
    rmse = [math.sqrt(np.mean((r.astype(float) - x) ** 2)) for r in res.recon]
    sizes = np.cumsum([s.bytes for s in res.segments])
    assert np.all(np.diff(sizes) >= 0) and rmse[-1] == 0
    assert rmse[-2] < rmse[len(rmse) // 2] < rmse[0]
    assert sum(s.kl_bits for s in res.segments[:-1]) > 0


def test_truncated_file_decodes_to_its_last_whole_step(full, calibrated):
    imgs, res = full
    info = lossy_info(res.data, calibrated)
    assert info["lossless_tail"] and len(info["segments"]) == 21 and len(info["steps"]) == 20
    assert [r["step"] for r in info["segments"]] == [*info["steps"][::-1], 0]
    # without the model: its chunk counts (differences from the model's prediction) stay unknown
    bare = lossy_info(res.data)
    assert bare["format_version"] == 3 and bare["segments"] is None and bare["steps"] is None
    tail = res.segments[-1].bytes
    cut = res.data[:len(res.data) - 4 - tail - 1]  # inside the last channel segment
    d = decode_lossy(cut, calibrated)
    assert d.truncated and not d.exact and d.segments_read < d.segments_in_file
    assert lossy_info(cut)["truncated"]
    # cut exactly at a segment boundary: the same as asking for that step
    ok = decode_lossy(res.data, calibrated, upto_step=d.step)
    for (_, a), (_, b) in zip(d.images, ok.images):
        assert np.array_equal(a, b)
    with pytest.raises(FormatError, match="truncated|header"):
        decode_lossy(res.data[:40], calibrated)


def test_corrupt_lossy_files_are_refused(full, calibrated):
    _, res = full
    data = bytearray(res.data)
    body_start = len(data) - 4 - sum(s.bytes for s in res.segments)
    j = next(i for i, s in enumerate(res.segments) if s.bytes)  # first non-empty segment
    pos = body_start + sum(s.bytes for s in res.segments[:j])
    bad = bytes(data[:pos]) + bytes([data[pos] ^ 0x10]) + bytes(data[pos + 1:])
    with pytest.raises(FormatError, match="checksum"):
        decode_lossy(bad, calibrated)
    with pytest.raises(FormatError, match="checksum"):  # also when cut short after the damage
        decode_lossy(bad[:-10], calibrated)
    with pytest.raises(FormatError, match="unexpected bytes"):
        decode_lossy(res.data + b"\0", calibrated)
    with pytest.raises(FormatError, match="checksum"):
        decode_lossy(res.data[:20] + bytes([res.data[20] ^ 1]) + res.data[21:], calibrated)


def test_stop_step_and_rate_limit(calibrated):
    imgs = named(6, seed=2)
    a = encode_lossy(imgs, calibrated, steps=20, stop_step=30)
    assert not a.complete and a.segments[-1].step >= 30
    assert all(s.step >= 30 for s in a.segments)
    full = encode_lossy(imgs, calibrated, steps=20)
    # the stopped file is the full file's prefix, re-framed: same segments
    assert [s.bytes for s in a.segments] == [s.bytes for s in full.segments[:len(a.segments)]]
    r = encode_lossy(imgs, calibrated, steps=20, rate=full.bits_per_dim * 0.6)
    assert r.bits_per_dim <= full.bits_per_dim * 0.6 and len(r.segments) < len(full.segments)
    d = decode_lossy(a.data, calibrated)
    assert d.step == a.segments[-1].step and not d.truncated
    for how in (Reconstruct.SAMPLE, Reconstruct.DDIM):
        out = decode_lossy(a.data, calibrated, reconstruct=how)
        assert all(im.shape == (8, 8, 1) and im.dtype == np.uint8 for _, im in out.images)


def test_decoder_in_another_process_with_other_threads(calibrated, tmp_path):
    imgs = named(5, seed=4)
    res = encode_lossy(imgs, calibrated, steps=10, batch=2)
    f = tmp_path / "x.ddpm"
    f.write_bytes(res.data)
    r = subprocess.run([sys.executable, "-c", "from ddpm_codec.cli.main import main; main()", "--threads", "2",
                        "decode", str(f), "--model", str(calibrated.path), "-o", str(tmp_path / "out"), "--json"],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["exact"] is True


def test_cli_lossy_commands(calibrated, tmp_path):
    for i, im in enumerate(tiny_images(3, seed=8)):
        Image.fromarray(im[..., 0]).save(tmp_path / f"d{i}.png")
    pngs = [str(tmp_path / f"d{i}.png") for i in range(3)]
    m = ["--model", str(calibrated.path)]
    run = CliRunner().invoke
    a = str(tmp_path / "a.ddpm")
    r = run(cli, ["encode", *pngs, "-o", a, "--lossy", "--steps", "10", "--json", *m], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["exact"] and out["bytes"] == os.path.getsize(a)
    i = json.loads(run(cli, ["info", a, "--json", *m]).stdout)
    assert i["format_version"] == 3 and i["mode"] == "lossy" and len(i["segments"]) == 11
    assert "pass --model" in run(cli, ["info", a]).stdout  # its segments follow from a model not shipped
    r = run(cli, ["decode", a, "-o", str(tmp_path / "o"), "--upto-step", "50", "--json", *m])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["step"] >= 50 and not d["exact"] and d["bits_per_dim"] < out["bits_per_dim"]
    r = run(cli, ["decode", a, "-o", str(tmp_path / "e"), "--json", *m])
    assert json.loads(r.stdout)["exact"]
    for n in range(3):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "e" / f"d{n}.png")),
                              np.asarray(Image.open(tmp_path / f"d{n}.png")))
    (tmp_path / "cut.ddpm").write_bytes(open(a, "rb").read()[:-30])
    r = run(cli, ["decode", str(tmp_path / "cut.ddpm"), "-o", str(tmp_path / "c"), *m])
    assert r.exit_code == 0 and "truncated" in r.stderr
    bad = [
        ["encode", pngs[0], "-o", str(tmp_path / "b.ddpm"), "--rate", "1", *m],  # --rate without --lossy
        ["encode", pngs[0], "-o", str(tmp_path / "b.ddpm"), "--lossy", "--rate", "1", "--stop-step", "3", *m],
        ["decode", a, "-o", str(tmp_path / "o2"), "--upto-step", "x", *m],
        ["encode", pngs[0], "-o", str(tmp_path / "b.ddpm"), "--lossy", "--kl-per-chunk", "40", *m],
    ]
    for args in bad:
        r = run(cli, args)
        assert r.exit_code == 2, (args, r.output)
    assert not (tmp_path / "b.ddpm").exists()


def test_other_model_is_refused(full, tiny_checkpoint):
    _, res = full
    with pytest.raises(DecodeError, match="model"):
        decode_lossy(res.data, checkpoint.load(tiny_checkpoint))


def test_rd_report(calibrated, tmp_path):
    for i, im in enumerate(tiny_images(4, seed=3)):
        Image.fromarray(im[..., 0]).save(tmp_path / f"d{i}.png")
    rep = tmp_path / "rep"
    args = ["rd", *[str(tmp_path / f"d{i}.png") for i in range(4)], "--model", str(calibrated.path), "--steps", "10",
            "--report", str(rep), "--json"]
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["monotone_rate"] and all(c["same_pixels"] for c in s["decode_checks"])
    full = json.loads((rep / "rd.json").read_text())
    rows = full["rows"]
    assert len(rows) == 11 and rows[-1]["rmse"] == 0 and rows[-1]["t"] == 0
    assert rows[-1]["coded_rate"] == pytest.approx(s["bits_per_dim"])
    assert {"jpeg_per_file", "webp_per_file", "jpeg_one_image", "webp_one_image"} <= set(full["classic"])
    assert all(p["rmse"] >= 0 and p["bits_per_dim"] > 0 for p in full["classic"]["jpeg_per_file"])
    assert "png" in full["lossless"]
    for f in ("rd.md", "rd.png", "progressive.png"):
        assert (rep / f).stat().st_size > 0
    assert CliRunner().invoke(cli, args).exit_code == 2  # no overwrite without --force


def test_fuzzed_lossy_files_are_refused_or_decode_a_true_prefix(calibrated):
    from ddpm_codec.eval.fuzz import fuzz_lossy

    res = encode_lossy(named(3, seed=6), calibrated, steps=8)
    r = fuzz_lossy(res.data, calibrated, n=40, seed=1)
    assert r["refused"] + r["decoded_prefix"] + r["decoded_whole"] == 40
    assert r["refused"] >= 20 and r["decoded_prefix"] >= 1


def test_exact_chain_kl_is_the_chains_bound(calibrated):
    """The paper's rate (KL with exact draws from q along the chain) adds up to the K-step bound
    that `likelihood.bound_full` estimates with independent draws: same expectation."""
    from ddpm_codec.diffusion import VarianceType
    from ddpm_codec.likelihood import bound_full

    imgs = named(24, seed=12)
    dims = sum(im.size for _, im in imgs)
    sched = calibrated.chain(10)
    var = calibrated.variance(sched, VarianceType.CALIBRATED)
    x0 = torch.from_numpy(np.stack([im.transpose(2, 0, 1) for _, im in imgs]).astype(np.float64) / 127.5 - 1)
    ours, theirs = [], []
    for seed in range(3):  # one draw differs by up to ±4 % on this tiny model; three agree to 0.2 %
        kl = exact_chain_kl(imgs, calibrated, steps=10, seed=seed)
        assert len(kl) == 11 and min(kl) >= 0
        ours.append(sum(kl) / dims)
        b = bound_full(calibrated.net, sched, x0, torch.Generator().manual_seed(seed), var)
        theirs.append(float(b.total.mean()))
    assert np.mean(ours) == pytest.approx(np.mean(theirs), rel=0.01)
    # segment 0 (x_T against N(0, I)) does not depend on the draw: same as the encoder's
    res = encode_lossy(imgs, calibrated, steps=10, stop_step=500)
    assert res.segments[0].kl_bits == pytest.approx(kl[0])


def test_files_of_the_rows_layout_still_decode(calibrated):
    """Files written before the window layout have no "candidates" key: rows of independent draws."""
    from ddpm_codec.coding.container import unpack_segments

    imgs = named(3, seed=21)
    res = encode_lossy(imgs, calibrated, steps=8, layout="rows", index_bits=8, kl_per_chunk=6)
    assert "candidates" not in unpack_segments(res.data)[0]
    dec = decode_lossy(res.data, calibrated)
    assert dec.exact and all(np.array_equal(a, b) for (_, a), (_, b) in zip(dec.images, imgs))
    new = encode_lossy(imgs, calibrated, steps=8)
    assert unpack_segments(new.data)[0]["candidates"] == "window"
    with pytest.raises(ValueError, match="layout"):
        encode_lossy(imgs, calibrated, steps=8, layout="rows", index_bits=18)


def test_chunk_counts_are_stored_as_differences_from_the_prediction(full, calibrated, tiny_checkpoint):
    """Version 3: the header holds each step's chunk count minus the count both sides predict
    from the model's calibration; the decoder's replay gives the encoder's counts. A model
    without a calibration has nothing to predict with: version 2, counts listed."""
    from ddpm_codec.coding.container import read_header, unpack_segments
    from ddpm_codec.lossy import ChunkCounts

    imgs, res = full
    h, _, _ = unpack_segments(res.data)
    assert h["_version"] == 3 and "chunks" not in h
    # version 3's header: checks in base64, 128 bits of the digest, a preset zlib dictionary
    import base64
    import zlib

    assert len(base64.b64decode(h["checks"])) == sum(1 for s in res.segments if s.bytes)
    assert len(h["pixels_sha256"]) == 32
    plain = {k: v for k, v in h.items() if not k.startswith("_")}
    text = json.dumps(plain, separators=(",", ":"), sort_keys=True).encode()
    assert read_header(res.data)["_header_len"] < len(zlib.compress(text, 9)) - 50
    coded = [s.chunks for s in res.segments if s.step > 0]
    assert len(h["chunks_vs_expected"]) == len(coded) and sum(coded) > 0
    dims = 12 * int(np.prod(imgs[0][1].shape))
    replayed = ChunkCounts(calibrated, calibrated.chain(20), dims, h["kl_per_chunk"]).replay(h["chunks_vs_expected"])
    assert replayed == coded
    # a difference that makes a count negative is refused
    with pytest.raises(FormatError, match="chunk counts"):
        ChunkCounts(calibrated, calibrated.chain(20), dims, 14.0).replay([-1])
    bare = checkpoint.load(tiny_checkpoint)
    assert bare.x0_mse is None
    old = encode_lossy(named(2), bare, steps=6)
    h2, _, _ = unpack_segments(old.data)
    assert h2["_version"] == 2 and h2["chunks"] == [s.chunks for s in old.segments if s.step > 0]
    assert decode_lossy(old.data, bare).exact


def test_ragged_images_are_cut_into_even_units(calibrated, tmp_path):
    """A side that is not a multiple of the tile gets units of nearly equal sides, as in lossless
    files (version 7); every reconstruction and the rd report see the same units."""
    from ddpm_codec.coding.container import LOSSY_EVEN_VERSION

    rng = np.random.default_rng(12)
    imgs = [("r.png", rng.integers(0, 256, (11, 17, 1), dtype=np.uint8))] + named(3)
    res = encode_lossy(imgs, calibrated, steps=8, batch=4, record=True)
    assert res.data[4] == LOSSY_EVEN_VERSION
    dec = decode_lossy(res.data, calibrated)
    assert dec.exact and all(np.array_equal(a, b) for (_, a), (_, b) in zip(dec.images, imgs))
    k = len(res.segments) // 2
    for how in Reconstruct:
        d = decode_lossy(res.data, calibrated, upto_step=res.segments[k].step, reconstruct=how)
        assert [im.shape for _, im in d.images] == [im.shape for _, im in imgs] and not d.exact
    assert sum(8 * s.bytes for s in res.segments) > 0
    # a version-7 file read as padded tiles (version 4) is refused
    from ddpm_codec.coding.container import LOSSY_LEARNED_VERSION, LOSSY_PREDICTED_VERSION

    for v in (LOSSY_LEARNED_VERSION, LOSSY_PREDICTED_VERSION):
        with pytest.raises((DecodeError, FormatError)):
            decode_lossy(res.data[:4] + v.to_bytes(2, "little") + res.data[6:], calibrated)
    Image.fromarray(imgs[0][1][..., 0]).save(tmp_path / "r.png")
    r = CliRunner().invoke(cli, ["rd", str(tmp_path / "r.png"), "--model", str(calibrated.path), "--steps", "6",
                                 "--report", str(tmp_path / "rep"), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["monotone_rate"] and all(c["same_pixels"] for c in s["decode_checks"])
