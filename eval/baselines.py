"""Classic lossless codecs on the same images, every decode checked exact (bits/dim, headers included)."""
from __future__ import annotations

import io

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


def lossless_table(images: list[np.ndarray]) -> dict:
    """bits/dim of each codec, one file per image, summed over the images."""
    dims = sum(im.size for im in images)
    out = {}
    for name, fn in [("png", png_bytes), ("webp_lossless", webp_lossless_bytes), ("jxl_lossless", jxl_lossless_bytes)]:
        sizes = [fn(im) for im in images]
        if all(s is not None for s in sizes):
            out[name] = 8 * sum(sizes) / dims
    return out
