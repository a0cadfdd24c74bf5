import gzip
import io
import pickle
import struct
import tarfile

import numpy as np
import pytest
from PIL import Image

from ddpm_codec.data import (DataError, load_cifar10, load_image, load_source, read_idx_images,
                             read_mnist_pickle, to_model_space, to_uint8)


def test_pixel_mapping_round_trips_every_level():
    u = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    x = to_model_space(u)
    assert x.shape == (1, 1, 16, 16) and x.min() == -1 and x.max() == 1
    np.testing.assert_array_equal(to_uint8(x), u)


def test_load_image_modes(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    Image.fromarray(rgb).save(tmp_path / "c.png")
    np.testing.assert_array_equal(load_image(tmp_path / "g.png")[..., 0], grey)
    np.testing.assert_array_equal(load_image(tmp_path / "c.png"), rgb)
    # fully opaque alpha is dropped losslessly; real transparency is refused
    rgba = np.dstack([rgb, np.full((5, 7), 255, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "a.png")
    np.testing.assert_array_equal(load_image(tmp_path / "a.png"), rgb)
    rgba[0, 0, 3] = 10
    Image.fromarray(rgba).save(tmp_path / "t.png")
    with pytest.raises(DataError, match="transparency"):
        load_image(tmp_path / "t.png")
    # palette images become RGB exactly
    Image.fromarray(rgb).quantize(8).save(tmp_path / "p.png")
    pal = Image.open(tmp_path / "p.png").convert("RGB")
    np.testing.assert_array_equal(load_image(tmp_path / "p.png"), np.asarray(pal))
    # 16-bit grey is refused
    Image.fromarray(grey.astype(np.uint16) * 200).save(tmp_path / "w.png")
    with pytest.raises(DataError, match="mode"):
        load_image(tmp_path / "w.png")
    (tmp_path / "x.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="not a readable image"):
        load_image(tmp_path / "x.png")
    with pytest.raises(DataError, match="no such file"):
        load_image(tmp_path / "missing.png")


def test_idx_reader():
    imgs = np.random.default_rng(1).integers(0, 256, (3, 4, 5), dtype=np.uint8)
    blob = struct.pack(">IIII", 0x803, 3, 4, 5) + imgs.tobytes()
    np.testing.assert_array_equal(read_idx_images(gzip.compress(blob))[..., 0], imgs)
    with pytest.raises(DataError):
        read_idx_images(blob[:-1])


def test_mnist_pickle_reader_recovers_exact_bytes():
    u = np.random.default_rng(2).integers(0, 256, (6, 784)).astype(np.uint8)
    x = (u / 256.0).astype(np.float32)
    lab = np.zeros(6, dtype=np.int64)
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as f:
        pickle.dump(((x[:2], lab[:2]), (x[2:4], lab[2:4]), (x[4:], lab[4:])), f)
    out = read_mnist_pickle(buf.getvalue())
    np.testing.assert_array_equal(out["test"].reshape(2, 784), u[4:])
    assert out["train"].shape == (2, 28, 28, 1)


def _write_cifar(path, rng):
    """A cifar-10-python.tar.gz in the official layout, with 2 images per batch."""
    batches = {}
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            data = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
            batches[name] = data
            blob = pickle.dumps({b"data": data, b"labels": [0, 1], b"batch_label": name.encode()})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return batches


def test_cifar10_tarball(tmp_path):
    batches = _write_cifar(tmp_path / "cifar-10-python.tar.gz", np.random.default_rng(3))
    test = load_cifar10(tmp_path / "cifar-10-python.tar.gz", "test")
    assert test.shape == (2, 32, 32, 3)
    # channel-major rows: the first 1024 bytes are the red plane
    np.testing.assert_array_equal(test[1, :, :, 0].ravel(), batches["test_batch"][1, :1024])
    np.testing.assert_array_equal(test[0, 5, 7], batches["test_batch"][0, [5 * 32 + 7, 1024 + 5 * 32 + 7,
                                                                            2048 + 5 * 32 + 7]])
    src = load_source(f"cifar10:{tmp_path / 'cifar-10-python.tar.gz'}:train")
    assert src.images.shape == (10, 32, 32, 3) and src.channels == 3
    with pytest.raises(DataError):
        load_cifar10(tmp_path / "missing.tar.gz", "test")


def test_folder_source_crops(tmp_path):
    rng = np.random.default_rng(4)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    src = load_source(str(tmp_path), crop=32, channels=3)
    batch = src.sample(np.random.default_rng(0), 5)
    assert batch.shape == (5, 32, 32, 3) and batch.dtype == np.uint8
    np.testing.assert_array_equal(src.take(4, np.random.default_rng(1)), src.take(4, np.random.default_rng(1)))


def test_unknown_source():
    with pytest.raises(DataError, match="unknown data source"):
        load_source("imagenet")


def test_photos_source_keeps_the_heldout_photos_out():
    pytest.importorskip("skimage")
    from ddpm_codec.data import HELDOUT_PHOTOS

    train = load_source("photos:train", crop=32, channels=3)
    held = load_source("photos:heldout", crop=32, channels=3)
    assert len(train.photos) >= 5 and len(held.photos) == 2  # astronaut and coffee are RGB; camera is grey
    assert not any(np.array_equal(a, b) for a in train.photos for b in held.photos)
    assert "astronaut" in HELDOUT_PHOTOS
    assert train.sample(np.random.default_rng(0), 3).shape == (3, 32, 32, 3)


def test_wallpapers_are_downscaled_and_join_other_photo_sources(tmp_path, monkeypatch):
    from ddpm_codec import data

    for name, size in [("Path", (900, 500)), ("EveningGlow", (640, 480)), ("BytheWater", (2560, 1600))]:
        d = tmp_path / name / "contents" / "images"
        d.mkdir(parents=True)
        Image.fromarray(np.full((size[1], size[0], 3), 90, np.uint8)).save(d / f"{size[0]}x{size[1]}.jpg")
    im = data.load_wallpaper("BytheWater", root=tmp_path)
    assert im.shape == (400, 640, 3)  # 1600 / 4
    assert data.load_wallpaper("EveningGlow", root=tmp_path).shape == (240, 320, 3)  # always at least 2×
    with pytest.raises(DataError, match="plasma-workspace-wallpapers"):
        data.load_wallpaper("Kite", root=tmp_path)
    monkeypatch.setattr(data, "WALLPAPER_PHOTOS", ["Path", "EveningGlow", "BytheWater"])
    monkeypatch.setattr(data, "HELDOUT_WALLPAPERS", ["Path"])
    monkeypatch.setattr(data, "WALLPAPER_DIR", tmp_path)
    monkeypatch.setattr(data.load_wallpaper, "__defaults__", (tmp_path, None))
    src = load_source("wallpapers:train", crop=32)
    assert src.name == "wallpapers:train" and len(src.photos) == 2
    assert len(load_source("wallpapers:heldout", crop=32).photos) == 1
    with pytest.raises(DataError, match="splits"):
        load_source("wallpapers:valid", crop=32)
    with pytest.raises(DataError, match="only photo sources"):
        load_source("mnist+wallpapers:train", crop=32)
    # reduced 2× instead: the same split, twice the side
    assert [p.shape for p in load_source("wallpapers2x:train", crop=32).photos] == [(240, 320, 3), (800, 1280, 3)]
    assert data.load_wallpaper("BytheWater", root=tmp_path, factor=1).shape == (800, 1280, 3)  # never below 2×


def test_mate_photos_are_reduced_2x_and_all_for_training(tmp_path, monkeypatch):
    from ddpm_codec import data

    rng = np.random.default_rng(0)
    for name, (w, h) in [("Aqua", (64, 48)), ("Dune", (90, 70))]:
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{name}.jpg", quality=95)
    monkeypatch.setattr(data, "MATE_PHOTOS", ["Aqua", "Dune"])
    monkeypatch.setattr(data.load_mate_photo, "__defaults__", (tmp_path,))
    src = load_source("mate:train", crop=16)
    assert src.name == "mate:train" and [p.shape for p in src.photos] == [(24, 32, 3), (35, 45, 3)]
    # a 2×2 box filter of the decoded JPEG
    full = np.asarray(Image.open(tmp_path / "Aqua.jpg").convert("RGB"), dtype=np.float64)
    box = full.reshape(24, 2, 32, 2, 3).mean(axis=(1, 3))
    assert np.abs(src.photos[0].astype(np.float64) - box).max() <= 1
    assert len(load_source("photos+mate:train", crop=16).photos) == 2 + len(load_source("photos:train", crop=16).photos)
    with pytest.raises(DataError, match="none held out"):
        load_source("mate:heldout", crop=16)
    with pytest.raises(DataError, match="mate-backgrounds"):
        data.load_mate_photo("Storm", root=tmp_path)
