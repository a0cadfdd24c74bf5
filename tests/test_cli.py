import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ddpm_codec.cli.main import cli
from conftest import tiny_images


def run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


@pytest.fixture()
def digit_files(tmp_path):
    paths = []
    for i, im in enumerate(tiny_images(3, seed=5)):
        p = tmp_path / f"d{i}.png"
        Image.fromarray(im[..., 0]).save(p)
        paths.append(str(p))
    return paths


def test_help_lists_the_commands():
    r = run(["--help"])
    assert r.exit_code == 0
    for cmd in ["train", "nll", "sample", "bench"]:
        assert cmd in r.output


def test_nll_json(tiny_checkpoint, digit_files):
    r = run(["nll", *digit_files, "--model", str(tiny_checkpoint), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    t = out["terms"]
    assert out["n"] == 3 and out["steps"] == 100
    assert out["bits_per_dim"] == pytest.approx(t["prior"] + t["diffusion"] + t["decoder"], rel=1e-9)
    assert 0 < out["bits_per_dim"] < 20
    r = run(["nll", *digit_files, "--model", str(tiny_checkpoint), "--steps", "10", "--json"])
    assert json.loads(r.stdout)["steps"] == 10


def test_nll_of_tiles(tiny_checkpoint, tmp_path):
    """--tile: image files cut into units of that size (the network is fully convolutional); the
    bound of 8×8 tiles is the mean of the tiles' bounds, whatever the files."""
    big = np.concatenate([np.concatenate(list(tiny_images(2, seed=s)), 1) for s in (6, 7)], 0)  # 16×16
    Image.fromarray(big[..., 0]).save(tmp_path / "big.png")
    for i, u in enumerate([big[:8, :8], big[:8, 8:], big[8:, :8], big[8:, 8:]]):
        Image.fromarray(u[..., 0]).save(tmp_path / f"t{i}.png")
    m = ["--model", str(tiny_checkpoint), "--steps", "10", "--json"]
    tiled = json.loads(run(["nll", str(tmp_path / "big.png"), "--tile", "8", *m]).stdout)
    parts = json.loads(run(["nll", *[str(tmp_path / f"t{i}.png") for i in range(4)], *m]).stdout)
    assert tiled["n"] == 4 and tiled["bits_per_dim"] == pytest.approx(parts["bits_per_dim"], rel=1e-9)
    whole = json.loads(run(["nll", str(tmp_path / "big.png"), "--tile", "16", *m]).stdout)
    assert whole["n"] == 1 and 0 < whole["bits_per_dim"] < float("inf")  # a barely trained model: no better bound
    for tile in ("7", "12"):  # not a multiple of the model's 2, or not a divisor of the sides
        r = run(["nll", str(tmp_path / "big.png"), "--tile", tile, *m])
        assert r.exit_code == 2 and "--tile" in r.stderr, r.output


def test_nll_bad_inputs_exit_2(tiny_checkpoint, tmp_path):
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(tmp_path / "big.png")
    (tmp_path / "x.png").write_bytes(b"no")
    cases = [
        ["nll", str(tmp_path / "big.png"), "--model", str(tiny_checkpoint)],
        ["nll", str(tmp_path / "x.png"), "--model", str(tiny_checkpoint)],
        ["nll", str(tmp_path / "missing.png"), "--model", str(tiny_checkpoint)],
        ["nll", str(tmp_path / "big.png"), "--model", str(tmp_path / "nomodel.pt")],
        ["nll", "imagenet", "--model", str(tiny_checkpoint)],
    ]
    for args in cases:
        r = run(args)
        assert r.exit_code == 2, (args, r.output)
        assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_sample_writes_a_grid_and_will_not_overwrite(tiny_checkpoint, tmp_path):
    out = tmp_path / "grid.png"
    r = run(["sample", "--model", str(tiny_checkpoint), "--n", "4", "--steps", "10", "-o", str(out)])
    assert r.exit_code == 0, r.output
    im = np.asarray(Image.open(out))
    assert im.shape == (2 * 10 + 2, 2 * 10 + 2)
    r = run(["sample", "--model", str(tiny_checkpoint), "--n", "4", "--steps", "10", "-o", str(out),
             "--method", "ddim"])
    assert r.exit_code == 2 and "exists" in r.stderr


def test_train_needs_a_budget(tmp_path):
    r = run(["train", "--data", "mnist", "--out", str(tmp_path / "x.pt")])
    assert r.exit_code == 2 and "budget" in r.stderr
