"""Mutation fuzzing of .ddpm files: every mutated file is refused with a clear error or decodes
to exactly the original images — never to something else."""
from __future__ import annotations

import numpy as np

from ddpm_codec.checkpoint import LoadedModel
from ddpm_codec.codec import DecodeError, decode
from ddpm_codec.coding.container import FormatError


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """Bit flips, a truncation, or inserted bytes."""
    out = bytearray(data)
    kind = int(rng.integers(3))
    if kind == 0:
        for _ in range(int(rng.integers(1, 4))):
            out[int(rng.integers(len(out)))] ^= 1 << int(rng.integers(8))
    elif kind == 1:
        out = out[: int(rng.integers(len(out)))]
    else:
        pos = int(rng.integers(len(out) + 1))
        out[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8).tobytes()
    return bytes(out)


def fuzz(data: bytes, originals: list[np.ndarray], model: LoadedModel, n: int, seed: int = 0) -> dict:
    """Decode ``n`` mutants of ``data``; count refusals and exact decodes; raise on a wrong image."""
    rng = np.random.default_rng(seed)
    counts = {"refused": 0, "decoded_exactly": 0}
    reasons: dict[str, int] = {}
    for _ in range(n):
        m = mutate(data, rng)
        try:
            out = decode(m, model)
        except (FormatError, DecodeError, ValueError) as e:
            counts["refused"] += 1
            key = str(e).split(":")[0][:60]
            reasons[key] = reasons.get(key, 0) + 1
            continue
        for (_, a), b in zip(out.images, originals):
            if not np.array_equal(a, b):
                raise AssertionError("a mutated file decoded to a different image")
        counts["decoded_exactly"] += 1
    return {**counts, "mutants": n, "reasons": reasons}


def fuzz_lossy(data: bytes, model: LoadedModel, n: int, seed: int = 0) -> dict:
    """Decode ``n`` mutants of a progressive file. Each must be refused with a clear error, or
    decode (a file cut short) to exactly what the intact file gives at the same step — never to
    anything else. Counts refusals, exact prefixes (and how many were full decodes)."""
    from ddpm_codec.lossy import decode_lossy

    rng = np.random.default_rng(seed)
    reference: dict[int, list[np.ndarray]] = {}
    counts = {"refused": 0, "decoded_prefix": 0, "decoded_whole": 0}
    reasons: dict[str, int] = {}
    for _ in range(n):
        m = mutate(data, rng)
        try:
            out = decode_lossy(m, model)
        except (FormatError, DecodeError, ValueError) as e:
            counts["refused"] += 1
            key = str(e).split(":")[0][:60]
            reasons[key] = reasons.get(key, 0) + 1
            continue
        if out.step not in reference:
            reference[out.step] = [im for _, im in decode_lossy(data, model, upto_step=out.step).images]
        for (_, a), b in zip(out.images, reference[out.step]):
            if not np.array_equal(a, b):
                raise AssertionError("a mutated progressive file decoded to something its intact prefix does not")
        counts["decoded_whole" if not out.truncated else "decoded_prefix"] += 1
    return {**counts, "mutants": n, "reasons": reasons}
