"""An independent numpy implementation of docs/SPEC.md (generator spec v1).

Written from the text of the spec, with numpy's uint64 arithmetic, to check the Rust
core against. Slow but vectorised; fine for D up to a few million.
"""

from __future__ import annotations

import hashlib

import numpy as np
import numpy.typing as npt

M64 = (1 << 64) - 1
M32 = np.uint64(0xFFFFFFFF)


def splitmix64_keys(seed: int, n: int = 4) -> list[int]:
    state = seed
    keys = []
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & M64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        z = z ^ (z >> 31)
        keys.append(z >> 32)
    return keys


def mix32(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    x = x & M32
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x21F0AAAD)) & M32
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0xD35A2D97)) & M32
    x = x ^ (x >> np.uint64(15))
    return x


def feistel_widths(total: int) -> tuple[int, int]:
    k = max(2, (total - 1).bit_length())
    return k // 2, k - k // 2


def encrypt(x: npt.NDArray[np.uint64], keys: list[int], wl: int, wr: int) -> npt.NDArray[np.uint64]:
    a, b = wl, wr
    left = x >> np.uint64(b)
    right = x & np.uint64((1 << b) - 1)
    for key in keys:
        f = mix32(right ^ np.uint64(key)) & np.uint64((1 << a) - 1)
        left, right = right, left ^ f
        a, b = b, a
    return (left << np.uint64(b)) | right


def permute(rows: npt.NDArray[np.uint64], seed: int, total: int) -> npt.NDArray[np.uint64]:
    keys = splitmix64_keys(seed)
    wl, wr = feistel_widths(total)
    x = encrypt(rows.astype(np.uint64), keys, wl, wr)
    out = x >= np.uint64(total)
    while out.any():
        x[out] = encrypt(x[out], keys, wl, wr)
        out = x >= np.uint64(total)
    return x


def projection(
    seed: int, total: int, d: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """(idx, scale) for rows 0..total-1, following the spec text."""
    y = permute(np.arange(total, dtype=np.uint64), seed, total)
    idx = (y % np.uint64(d)).astype(np.int64)
    q, rem = divmod(total, d)
    n = np.where(idx < rem, q + 1, q).astype(np.float64)
    scale = (1.0 / np.sqrt(n)).astype(np.float32)
    return idx, scale


#: Consecutive t values summed into one partial sum by the backward pass (SPEC 1.4).
T_CHUNK = 64


def backward(grad: npt.NDArray[np.float32], seed: int, d: int) -> npt.NDArray[np.float32]:
    """``P^T grad`` in the spec's summation order, float32 throughout.

    Column ``j`` owns the images ``y = j + t d``; chunk ``c`` holds ``t`` in
    ``[64 c, 64 c + 64)``. Each chunk sum starts at 0.0 and adds ``grad[perm^-1(y)]`` in
    increasing ``t``; the chunk sums are added in chunk order from 0.0; the total is
    multiplied by the column's scale. Vectorised over the columns (the order per column
    is unchanged: every addition below is one float32 addition per column).
    """
    total = len(grad)
    y = permute(np.arange(total, dtype=np.uint64), seed, total)  # perm(i)
    inv = np.empty(total, dtype=np.int64)
    inv[y.astype(np.int64)] = np.arange(total)  # perm^-1
    n_t = -(-total // d)
    acc = np.zeros(d, dtype=np.float32)
    for c0 in range(0, n_t, T_CHUNK):
        part = np.zeros(d, dtype=np.float32)
        for t in range(c0, min(n_t, c0 + T_CHUNK)):
            ys = np.arange(t * d, min(total, (t + 1) * d))
            part[: len(ys)] = part[: len(ys)] + grad[inv[ys]]
        acc = acc + part
    _, scale_of_column = projection_scales(total, d)
    return acc * scale_of_column


def projection_scales(total: int, d: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Per column: ``n_j`` and ``scale_j = float32(1 / sqrt(n_j))``."""
    q, rem = divmod(total, d)
    n = np.where(np.arange(d) < rem, q + 1, q)
    return n, (1.0 / np.sqrt(n.astype(np.float64))).astype(np.float32)


def reconstruct(
    vector: npt.NDArray[np.float32], seed: int, shapes: list[tuple[int, int]]
) -> list[npt.NDArray[np.float32]]:
    total = sum(r * c for r, c in shapes)
    idx, scale = projection(seed, total, len(vector))
    flat = vector[idx] * scale
    out, off = [], 0
    for r, c in shapes:
        out.append(flat[off : off + r * c].reshape(r, c))
        off += r * c
    return out


def fingerprint(seed: int, d: int, named: list[tuple[str, int, int]]) -> str:
    text = f"unilora-spec-v1\nseed={seed}\nd={d}\n" + "".join(
        f"{n}\t{r}\t{c}\n" for n, r, c in named
    )
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def checksum(idx: npt.NDArray[np.integer], scale: npt.NDArray[np.float32]) -> str:
    """SHA-256 over idx as little-endian u32 then scale as little-endian f32 bits."""
    h = hashlib.sha256()
    h.update(idx.astype("<u4").tobytes())
    h.update(scale.astype("<f4").tobytes())
    return h.hexdigest()
