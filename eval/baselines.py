"""Classic lossless codecs on the same images, every decode checked exact (bits/dim, headers included)."""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image


def _pil(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


def _roundtrip_pil(arr: np.ndarray, fmt: str, **opts) -> int:
    buf = io.BytesIO()
    _pil(arr).save(buf, format=fmt, **opts)
    back = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L" if arr.shape[-1] == 1 else "RGB"))
    if not np.array_equal(back.reshape(arr.shape), arr):
        raise AssertionError(f"{fmt} did not round-trip")
    return len(buf.getvalue())


def png_bytes(arr: np.ndarray) -> int:
    return _roundtrip_pil(arr, "PNG", optimize=True, compress_level=9)


def webp_lossless_bytes(arr: np.ndarray) -> int:
    return _roundtrip_pil(arr, "WEBP", lossless=True, quality=100, method=6)


def jxl_lossless_bytes(arr: np.ndarray) -> int | None:
    """JPEG XL lossless, effort 9, through imagecodecs (``pip install 'ddpm-codec[eval]'``); None without it."""
    try:
        import imagecodecs
    except ImportError:
        return None
    a = arr[..., 0] if arr.shape[-1] == 1 else arr
    data = imagecodecs.jpegxl_encode(a, lossless=True, effort=9)
    if not np.array_equal(np.asarray(imagecodecs.jpegxl_decode(data)).reshape(arr.shape), arr):
        raise AssertionError("JPEG XL did not round-trip")
    return len(data)


LOSSLESS_CODECS = (("png", png_bytes), ("webp_lossless", webp_lossless_bytes), ("jxl_lossless", jxl_lossless_bytes))


def lossless_table(images: list[np.ndarray]) -> dict:
    """bits/dim of each codec, one file per image, summed over the images."""
    dims = sum(im.size for im in images)
    out = {}
    for name, fn in LOSSLESS_CODECS:
        sizes = [fn(im) for im in images]
        if all(s is not None for s in sizes):
            out[name] = 8 * sum(sizes) / dims
    return out


def grid_of(images: list[np.ndarray]) -> np.ndarray:
    """Equal-size images side by side in a near-square grid (no padding between them)."""
    n = len(images)
    h, w, c = images[0].shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    g = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        g[r * h:(r + 1) * h, q * w:(q + 1) * w] = im
    return g


def lossless_one_image(images: list[np.ndarray]) -> dict:
    """bits/dim of each codec on all (equal-size) images tiled into one near-square image — how
    REFERENCE.md quotes "all digits in one image"; the grid's empty slots are not counted as dims."""
    if len({im.shape for im in images}) != 1:
        return {}
    dims = sum(im.size for im in images)
    g = grid_of(images)
    out = {}
    for name, fn in LOSSLESS_CODECS:
        size = fn(g)
        if size is not None:
            out[name] = 8 * size / dims
    return out
