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


# ---------------------------------------------------------------------------------------
# The Fastfood projection (docs/SPEC.md section 4, spec v2)
# ---------------------------------------------------------------------------------------

FASTFOOD_TAG = 0x6661_7374_666F_6F64
GAMMA = 0x9E3779B97F4A7C15


def fastfood_sizes(total: int, d: int) -> tuple[int, int, int]:
    """``(bits, n, blocks)``: ``n = 2^bits`` the smallest power of two >= max(d, 4)."""
    bits = max(2, (d - 1).bit_length())
    n = 1 << bits
    return bits, n, -(-total // n)


def fastfood_block_words(seed: int, b: int) -> list[int]:
    """Words ``11 b .. 11 b + 10`` of the splitmix64 stream from ``seed ^ TAG`` (high halves)."""
    state = ((seed ^ FASTFOOD_TAG) + 11 * b * GAMMA) & M64
    return splitmix64_keys(state, 11)


def fastfood_block(
    seed: int, total: int, d: int, b: int
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.float32], npt.NDArray[np.int64], np.float32]:
    """``(B < 0, G, Π, c_b)`` of block ``b``, from the spec text."""
    bits, n, blocks = fastfood_sizes(total, d)
    w = fastfood_block_words(seed, b)
    i = np.arange(n, dtype=np.uint64)
    negative = (mix32(i ^ np.uint64(w[4])) >> np.uint64(31)) == 1
    s = np.zeros(n, dtype=np.int64)
    for key in w[5:]:
        h = mix32(i ^ np.uint64(key))
        s += ((h & np.uint64(0xFFFF)) + (h >> np.uint64(16))).astype(np.int64)
    k = s - 393_210
    gauss = (k.astype(np.float32) / np.float32(65536)).astype(np.float32)
    perm = encrypt(i, w[:4], bits // 2, bits - bits // 2).astype(np.int64)
    q = sum(int(x) * int(x) for x in k)
    c = np.float32(1.0 / np.sqrt(float(blocks) * (float(q) * n / 2**32)))
    return negative, gauss, perm, c


def fwht(v: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Stages h = 1, 2, 4, ...: (v[i], v[i + h]) -> (v[i] + v[i + h], v[i] - v[i + h])."""
    v = v.astype(np.float32).copy()
    n, h = len(v), 1
    while h < n:
        pairs = v.reshape(n // (2 * h), 2, h)
        a, b = pairs[:, 0].copy(), pairs[:, 1].copy()
        pairs[:, 0], pairs[:, 1] = a + b, a - b
        h *= 2
    return v


def fastfood_forward(
    theta: npt.NDArray[np.float32], seed: int, total: int
) -> npt.NDArray[np.float32]:
    d = len(theta)
    _, n, blocks = fastfood_sizes(total, d)
    x = np.zeros(n, dtype=np.float32)
    x[:d] = theta
    out = []
    for b in range(blocks):
        negative, gauss, perm, c = fastfood_block(seed, total, d, b)
        v = fwht(np.where(negative, -x, x))
        out.append(c * fwht(gauss * v[perm]))
    return np.concatenate(out)[:total]


def fastfood_backward(grad: npt.NDArray[np.float32], seed: int, d: int) -> npt.NDArray[np.float32]:
    total = len(grad)
    _, n, blocks = fastfood_sizes(total, d)
    acc = np.zeros(d, dtype=np.float32)
    for b in range(blocks):
        negative, gauss, perm, c = fastfood_block(seed, total, d, b)
        u = np.zeros(n, dtype=np.float32)
        rows = grad[b * n : (b + 1) * n]
        u[: len(rows)] = rows
        u = fwht(u)
        z = np.zeros(n, dtype=np.float32)
        z[perm] = gauss * u
        z = fwht(z)
        acc = acc + c * np.where(negative, -z, z)[:d]
    return acc
