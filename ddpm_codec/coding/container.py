"""The .ddpm file: magic, format version, a JSON header, the payload, checksums.

    offset  size  field
    0       4     magic b"DDPM"
    4       2     format version (uint16, little-endian)
    6       4     header length n (uint32)
    10      n     header: zlib-compressed UTF-8 JSON (mode, model id, schedule and steps, grid,
                  names and shapes, tiles, coder parameters, payload length, SHA-256 of the pixels)
    10+n    4     CRC-32 of bytes 0 … 10+n
    14+n    4·m   payload: m uint32 words, little-endian (m = header["payload_words"])
    …       4     CRC-32 of the payload

Everything else a reader needs is in the header; a reader refuses an unknown
version, a bad checksum and a truncated or over-long file with a one-line reason.

Versions: 1 is the lossless file above (payload in 32-bit words). 2 adds the progressive
lossy file: the same layout with a payload of ``payload_bytes`` bytes made of segments
(one per coded step, their chunk counts and 8-bit checks in the header), so a file cut short still
decodes up to its last whole segment (``unpack_segments``). 3 is the lossy file whose header
holds each step's chunk count as its difference from a prediction made from the model
(``lossy.ChunkCounts``; key ``chunks_vs_expected`` instead of ``chunks``), its segment checks in
base64 (hex in 2), and is compressed with a preset dictionary (``HEADER_DICT``). Writers use the
lowest version that can express the file, so lossless files stay readable by version-1 readers.
5 is the lossless file of version 1 whose tiles (header key "tile") differ from the model's image
size: the network is fully convolutional, so a model trained on 32×32 crops can code 64×64
units, which see across the edges that 32×32 tiles cut (``codec.encode_lossless``'s ``tile``).
6 is the lossless file whose units are not all square tiles: an image whose side is not a
multiple of the tile is cut into as many units as tiles, with sides as equal as the network
allows (``codec.UnitLayout``), instead of padding the last tile; writers use it only for images
where that differs from version 1 or 5; it may also code a tiled first image's first units as
quarters (header key "ramp"), so the first whole unit's dip is not paid as initial bits. 7 is the
lossy file of version 3 or 4 (its header's variance says which) whose units are cut as in 6
(without a ramp). 8 and 9 are the files of versions 6 and 7 whose network runs as a flip
ensemble (header key "flips": "h" or "hv", ``diffusion.FlipEnsemble``); writers use them only
for such files. 10 is the lossless file of version 6 whose reverse steps couple the colour
channels (header key "coupling": the ρ of the x̂_0 errors between channels that the encoder
measured on the file's images, 7 rows of 3 integers in 1/256, ``coupling.ANCHORS``; each step
coded R, then G given R, then B given both — ``coupling``); its "flips" key is optional (absent:
the plain network). Writers use it only for such files. 11 is the lossless file of version 6
whose p's error variance is refitted per channel to the file's images (header key "var_scale":
a list of fits, each 7 rows of 2 integers per channel, a scale in 1/256 and a floor in 1/256 of
a pixel level squared, ``varscale``; "var_scale_of": each image's fit, where there are several);
"flips" and "coupling" are optional.
Writers use it only for such files. 12 is the lossless file of version 6 whose decoder step
(x_0 given x_1) codes each unit's pixels in two checkerboard phases, the second given the
first's residuals (header key "spatial": 2 integers per channel, a weight and a variance factor
in 1/256, ``spatial``); "flips", "coupling", "var_scale" and "var_scale_of" are optional.
13 is the lossless file of version 6 whose network is adapted to the file (header key "adapt": the
grid exponent, the fine-tuning's step count, and one width code per parameter group, ``adapt``): the
changes to the network's biases and normalisations are the first thing on the stack, the payload's
top; "flips", "coupling", "var_scale", "var_scale_of" and "spatial" are optional.
"""
from __future__ import annotations

import json
import re
import struct
import zlib
from dataclasses import dataclass

import numpy as np

MAGIC = b"DDPM"
VERSION = 13  # the highest version this reader knows
LOSSLESS_VERSION = 1
LOSSLESS_TILED_VERSION = 5  # as 1, with tiles of a size other than the model's
LOSSLESS_EVEN_VERSION = 6  # as 5, edge units not padded: unit sides split the image evenly (``codec.UnitLayout``)
LOSSLESS_FLIPS_VERSION = 8  # as 6, the network a flip ensemble (header key "flips")
LOSSLESS_COUPLED_VERSION = 10  # as 6, colour channels coupled (header key "coupling": ρ; "flips" optional)
LOSSLESS_SCALED_VERSION = 11  # as 6, the error variance scaled (header key "var_scale"; "flips", "coupling" optional)
LOSSLESS_SPLIT_VERSION = 12  # as 6, a checkerboard decoder (header key "spatial"; "flips", "coupling", "var_scale" optional)
LOSSLESS_ADAPTED_VERSION = 13  # as 6, the network adapted to the file (header key "adapt"; the others optional)
LOSSLESS_VERSIONS = (LOSSLESS_VERSION, LOSSLESS_TILED_VERSION, LOSSLESS_EVEN_VERSION, LOSSLESS_FLIPS_VERSION,
                     LOSSLESS_COUPLED_VERSION, LOSSLESS_SCALED_VERSION, LOSSLESS_SPLIT_VERSION, LOSSLESS_ADAPTED_VERSION)
LOSSY_VERSION = 2  # chunk counts listed
LOSSY_PREDICTED_VERSION = 3  # chunk counts as differences from the model's prediction
LOSSY_LEARNED_VERSION = 4  # as 3, with the learned variance: σ per dimension, chunks balanced by predicted KL
LOSSY_EVEN_VERSION = 7  # as 3 or 4 (the header's variance says which; chunk counts listed if the model has no
# calibration to predict them), units of even sides (``codec.UnitLayout``)
LOSSY_FLIPS_VERSION = 9  # as 7, the network a flip ensemble (header key "flips")
SEGMENTED_VERSIONS = (LOSSY_VERSION, LOSSY_PREDICTED_VERSION, LOSSY_LEARNED_VERSION, LOSSY_EVEN_VERSION,
                      LOSSY_FLIPS_VERSION)
_FIXED = struct.Struct("<4sHI")
MAX_HEADER = 64 << 20  # decompressed header bytes a reader accepts


# The zlib preset dictionary of version-3 headers: a typical header's keys and common values, so
# a small file's header does not pay for them (with version 3's other changes, one MNIST digit's
# header went from 458 to 209 bytes). Part of the format: never change it (zlib checks its
# Adler-32; a new dictionary needs a new version).
HEADER_DICT = (
    b'{"batch":256,"candidates":"window","channels":3,"checks":"","chunks_vs_expected":[0,0,0,0,0,0,0,0,0,0,0,'
    b'0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0],"encoder":"ddpm-codec 0.1.0","index_bits":16,"kl_per_chunk":14.0,'
    b'"mode":"lossy","model":"","names":["image.png"],"payload_bytes":1,"pixels_sha256":"","schedule":{"K":'
    b'100,"T":1000,"kind":"linear","spacing":"even"},"shapes":[[256,256]],"tail":true,"tail_scale":1.0,'
    b'"threads":2,"tile":32,"variance":"beta_tilde"}'
    b'{"batch":256,"candidates":"window","channels":1,"checks":"","chunks_vs_expected":[0,0,0,0,0,0,0,0,0,0,0,'
    b'0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0],"encoder":"ddpm-codec 0.1.0","index_bits":16,'
    b'"kl_per_chunk":14.0,"mode":"lossy","model":"","names":{"count":100,"prefix":"","start":0,"suffix":'
    b'".png","width":5},"payload_bytes":1,"pixels_sha256":"","schedule":{"K":100,"T":1000,"kind":"cosine",'
    b'"spacing":"optimal"},"shapes":[[28,28],[28,28],[28,28],[28,28],[28,28],[28,28]],"tail":true,'
    b'"tail_scale":1.25,"threads":1,"tile":28,"variance":"calibrated"}'
)


class FormatError(ValueError):
    """A file that is not a valid .ddpm file of this version; the message is one line."""


@dataclass
class Container:
    header: dict
    payload: np.ndarray  # uint32 words
    version: int = LOSSLESS_VERSION

    def to_bytes(self) -> bytes:
        if self.version not in LOSSLESS_VERSIONS:
            raise ValueError(f"lossless files are versions {LOSSLESS_VERSIONS}, not {self.version}")
        header = dict(self.header, payload_words=int(self.payload.size))
        hbytes = zlib.compress(json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8"), 9)
        head = _FIXED.pack(MAGIC, self.version, len(hbytes)) + hbytes
        body = self.payload.astype("<u4").tobytes()
        return b"".join([head, struct.pack("<I", zlib.crc32(head)), body, struct.pack("<I", zlib.crc32(body))])

    @classmethod
    def from_bytes(cls, data: bytes) -> "Container":
        header = read_header(data)
        if "payload_words" not in header:
            raise FormatError("not a lossless file (its payload is not in words)")
        n = _FIXED.size + header["_header_len"]
        start = n + 4
        words = header["payload_words"]
        end = start + 4 * words
        if len(data) < end + 4:
            raise FormatError(f"truncated file: {len(data)} bytes, the header announces {end + 4}")
        if len(data) > end + 4:
            raise FormatError(f"{len(data) - end - 4} unexpected bytes after the payload")
        body = data[start:end]
        (crc,) = struct.unpack("<I", data[end:end + 4])
        if zlib.crc32(body) != crc:
            raise FormatError("payload checksum mismatch: the file is corrupt")
        header.pop("_header_len")
        return cls(header, np.frombuffer(body, dtype="<u4").astype(np.uint32), header["_version"])


def header_flips(header: dict, flips_version: int) -> str:
    """The flip ensemble a header names: its "flips" (h or hv) in a ``flips_version`` file (and,
    optionally, in a version-10 or 11 file), else "none"."""
    optional = (LOSSLESS_COUPLED_VERSION, LOSSLESS_SCALED_VERSION, LOSSLESS_SPLIT_VERSION, LOSSLESS_ADAPTED_VERSION)
    if header["_version"] in optional and "flips" not in header:
        return "none"
    if header["_version"] not in (flips_version, *optional):
        if "flips" in header:
            raise FormatError(f"header: flips in a version-{header['_version']} file")
        return "none"
    flips = header.get("flips")
    if flips not in ("h", "hv"):
        raise FormatError(f"header: flips {flips!r} in a version-{header['_version']} file")
    return flips


def header_coupling(header: dict) -> list | None:
    """The colour coupling a header states (version 10: ``coupling.ANCHORS`` rows of three
    integers, checked by ``coupling.check``), else None."""
    from ..coupling import check

    if header["_version"] not in (LOSSLESS_COUPLED_VERSION, LOSSLESS_SCALED_VERSION, LOSSLESS_SPLIT_VERSION, LOSSLESS_ADAPTED_VERSION):
        if "coupling" in header:
            raise FormatError(f"header: coupling in a version-{header['_version']} file")
        return None
    if header["_version"] in (LOSSLESS_SCALED_VERSION, LOSSLESS_SPLIT_VERSION, LOSSLESS_ADAPTED_VERSION) \
            and "coupling" not in header:
        return None
    stated = header.get("coupling")
    try:
        if not isinstance(stated, list) or not all(isinstance(r, list) and all(type(v) is int for v in r)
                                                    for r in stated):
            raise ValueError("not rows of integers")
        check(stated)
    except ValueError as e:
        raise FormatError(f"header: bad coupling in a version-{header['_version']} file ({e})") from None
    return stated


def header_var_scale(header: dict, channels: int, n_images: int) -> tuple[list, list[int]] | None:
    """The variance fits a header states and which fit each image uses (version 11: "var_scale",
    a list of fits, each ``coupling.ANCHORS`` rows checked by ``varscale.check``; "var_scale_of",
    one fit index per image, where there is more than one fit), else None."""
    from ..varscale import check

    if header["_version"] not in (LOSSLESS_SCALED_VERSION, LOSSLESS_SPLIT_VERSION, LOSSLESS_ADAPTED_VERSION):
        if "var_scale" in header or "var_scale_of" in header:
            raise FormatError(f"header: var_scale in a version-{header['_version']} file")
        return None
    if (header["_version"] in (LOSSLESS_SPLIT_VERSION, LOSSLESS_ADAPTED_VERSION) and "var_scale" not in header
            and "var_scale_of" not in header):
        return None
    fits, of = header.get("var_scale"), header.get("var_scale_of")
    try:
        if not isinstance(fits, list) or not fits:
            raise ValueError("no fits")
        for fit in fits:
            if not isinstance(fit, list) or not all(isinstance(r, list) and all(type(v) is int for v in r)
                                                    for r in fit):
                raise ValueError("not rows of integers")
            check(fit, channels)
        if of is None and len(fits) == 1:
            of = [0] * n_images
        if (not isinstance(of, list) or len(of) != n_images
                or not all(type(i) is int and 0 <= i < len(fits) for i in of)):
            raise ValueError("var_scale_of must give each image a fit")
    except ValueError as e:
        raise FormatError(f"header: bad var_scale in a version-{header['_version']} file ({e})") from None
    return fits, of


def header_spatial(header: dict, channels: int) -> list | None:
    """The checkerboard decoder a header states (version 12: "spatial", 2·``channels`` integers
    checked by ``spatial.check``), else None."""
    from ..spatial import check

    if header["_version"] not in (LOSSLESS_SPLIT_VERSION, LOSSLESS_ADAPTED_VERSION):
        if "spatial" in header:
            raise FormatError(f"header: spatial in a version-{header['_version']} file")
        return None
    if header["_version"] == LOSSLESS_ADAPTED_VERSION and "spatial" not in header:
        return None
    stated = header.get("spatial")
    try:
        if not isinstance(stated, list) or not all(type(v) is int for v in stated):
            raise ValueError("not a list of integers")
        check(stated, channels)
    except ValueError as e:
        raise FormatError(f"header: bad spatial in a version-{header['_version']} file ({e})") from None
    return stated


def header_adapt(header: dict) -> dict | None:
    """The adaptation a header states (version 13: "adapt", {"grid": the grid exponent, "steps":
    the fine-tuning's steps, "widths": one integer code per parameter group}), else None. The
    widths' count is checked against the network by ``adapt.pop``."""
    if header["_version"] != LOSSLESS_ADAPTED_VERSION:
        if "adapt" in header:
            raise FormatError(f"header: adapt in a version-{header['_version']} file")
        return None
    stated = header.get("adapt")
    if (not isinstance(stated, dict) or type(stated.get("grid")) is not int or type(stated.get("steps")) is not int
            or not isinstance(stated.get("widths"), list) or not all(type(v) is int for v in stated["widths"])):
        raise FormatError(f"header: bad adapt in a version-{LOSSLESS_ADAPTED_VERSION} file")
    return stated


def read_header(data: bytes) -> dict:
    """Check magic, version and header checksum; return the header (with ``_header_len``)."""
    if len(data) == 0:
        raise FormatError("empty file")
    if len(data) < _FIXED.size or data[:4] != MAGIC:
        raise FormatError("not a .ddpm file (bad magic number)")
    _, version, hlen = _FIXED.unpack(data[:_FIXED.size])
    if not 1 <= version <= VERSION:
        raise FormatError(f"format version {version}; this ddpm-codec reads versions 1 to {VERSION}")
    n = _FIXED.size + hlen
    if len(data) < n + 4:
        raise FormatError("truncated file (inside the header)")
    (crc,) = struct.unpack("<I", data[n:n + 4])
    if zlib.crc32(data[:n]) != crc:
        raise FormatError("header checksum mismatch: the file is corrupt")
    try:
        d = zlib.decompressobj(zdict=HEADER_DICT)  # used only by streams that ask for it (version 3)
        raw = d.decompress(data[_FIXED.size:n], MAX_HEADER)
        if d.unconsumed_tail or not d.eof:
            raise FormatError("header too large or incomplete")
        header = json.loads(raw.decode("utf-8"))
    except (zlib.error, UnicodeDecodeError, json.JSONDecodeError):
        raise FormatError("unreadable header") from None
    key = "payload_words" if version in LOSSLESS_VERSIONS else "payload_bytes"
    if not isinstance(header, dict) or not isinstance(header.get(key), int) or header[key] < 0:
        raise FormatError("header lacks the payload length")
    header["_header_len"] = hlen
    header["_version"] = version
    return header


def pack_segments(header: dict, body: bytes, version: int = LOSSY_VERSION) -> bytes:
    """A segmented (lossy) file: the header (``payload_bytes`` added), its CRC, the body, the body's CRC."""
    if version not in SEGMENTED_VERSIONS:
        raise ValueError(f"version {version} is not a segmented file's")
    header = dict(header, payload_bytes=len(body))
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    if version != LOSSY_VERSION:
        z = zlib.compressobj(9, zdict=HEADER_DICT)
        hbytes = z.compress(text) + z.flush()
    else:
        hbytes = zlib.compress(text, 9)
    head = _FIXED.pack(MAGIC, version, len(hbytes)) + hbytes
    return b"".join([head, struct.pack("<I", zlib.crc32(head)), body, struct.pack("<I", zlib.crc32(body))])


def unpack_segments(data: bytes) -> tuple[dict, bytes, bool]:
    """(header, the body bytes present, whether the file is complete). A complete file's body
    CRC is checked here; a short one is returned as far as it goes (its segments carry their
    own checks); an over-long one is refused."""
    header = read_header(data)
    if header["_version"] not in SEGMENTED_VERSIONS:
        raise FormatError("not a segmented (lossy) file")
    start = _FIXED.size + header.pop("_header_len") + 4
    end = start + header["payload_bytes"]
    if len(data) > end + 4:
        raise FormatError(f"{len(data) - end - 4} unexpected bytes after the payload")
    if len(data) < end + 4:
        return header, data[start:end], False
    body = data[start:end]
    (crc,) = struct.unpack("<I", data[end:end + 4])
    if zlib.crc32(body) != crc:
        raise FormatError("payload checksum mismatch: the file is corrupt")
    return header, body, True


_NUMBERED = re.compile(r"^(.*?)(\d+)(\D*)$")


def pack_names(names: list[str]) -> list[str] | dict:
    """The header's ``names``: a list, or for numbered files (``frame0007.png``, ``frame0008.png``,
    …: one prefix and suffix, consecutive numbers of one width or unpadded) the dict
    ``{"prefix", "start", "count", "width", "suffix"}`` (width 0: unpadded) — on 100 numbered
    images 209 bytes of header become about 40."""
    if len(names) < 3:
        return list(names)
    m = _NUMBERED.match(names[0])
    if m is None:
        return list(names)
    prefix, digits, suffix = m.groups()
    width = len(digits) if digits.startswith("0") and len(digits) > 1 else 0
    packed = {"prefix": prefix, "start": int(digits), "count": len(names), "width": width, "suffix": suffix}
    try:
        same = unpack_names(packed) == list(names)
    except FormatError:
        same = False
    return packed if same else list(names)


def unpack_names(value) -> list[str]:
    """The file names a header's ``names`` stands for (see ``pack_names``)."""
    if isinstance(value, list):
        if not all(isinstance(n, str) for n in value):
            raise FormatError("header: names must be strings")
        return value
    if isinstance(value, dict):
        try:
            prefix, suffix = str(value["prefix"]), str(value["suffix"])
            start, count, width = int(value["start"]), int(value["count"]), int(value["width"])
        except (KeyError, TypeError, ValueError):
            raise FormatError("header: malformed numbered names") from None
        if start < 0 or not 0 <= count <= 1 << 24 or not 0 <= width <= 32:
            raise FormatError("header: malformed numbered names")
        return [f"{prefix}{i:0{width}d}{suffix}" if width else f"{prefix}{i}{suffix}"
                for i in range(start, start + count)]
    raise FormatError("header: names must be a list")
