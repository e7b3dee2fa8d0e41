"""An independent, pure-Python reading of docs/SPEC.md section 1 (Python integers only).

Used by the torch tests as the reference for the generator at sizes (D > 2^32) that the
Rust map cannot materialise, and for the backward pass's summation order (chunks of 64
consecutive t, see SPEC 1.4).
"""

from __future__ import annotations

import math

import numpy as np

M32 = (1 << 32) - 1
M64 = (1 << 64) - 1


def round_keys(seed: int) -> list[int]:
    state = seed
    keys = []
    for _ in range(4):
        state = (state + 0x9E3779B97F4A7C15) & M64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        keys.append((z ^ (z >> 31)) >> 32)
    return keys


def mix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & M32
    x ^= x >> 15
    x = (x * 0xD35A2D97) & M32
    return x ^ (x >> 15)


class Spec:
    """perm, perm^-1, idx and scale of spec v1 for one (seed, D, d)."""

    def __init__(self, seed: int, total: int, d: int) -> None:
        self.total, self.d = total, d
        self.keys = round_keys(seed)
        k = max(2, (total - 1).bit_length())
        self.wl, self.wr = k // 2, k - k // 2

    def _e(self, x: int) -> int:
        a, b = self.wl, self.wr
        left, right = x >> b, x & ((1 << b) - 1)
        for key in self.keys:
            f = mix32(right ^ key) & ((1 << a) - 1)
            left, right = right, left ^ f
            a, b = b, a
        return (left << b) | right

    def _e_inv(self, y: int) -> int:
        a, b = self.wl, self.wr
        left, right = y >> b, y & ((1 << b) - 1)
        for key in reversed(self.keys):
            a, b = b, a
            left, right = right ^ (mix32(left ^ key) & ((1 << a) - 1)), left
        return (left << b) | right

    def perm(self, i: int) -> int:
        x = self._e(i)
        while x >= self.total:
            x = self._e(x)
        return x

    def perm_inv(self, y: int) -> int:
        x = self._e_inv(y)
        while x >= self.total:
            x = self._e_inv(x)
        return x

    def idx(self, i: int) -> int:
        return self.perm(i) % self.d

    def count(self, j: int) -> int:
        return self.total // self.d + (1 if j < self.total % self.d else 0)

    def scale(self, j: int) -> np.float32:
        return np.float32(1.0 / math.sqrt(float(self.count(j))))

    def backward(self, grad: np.ndarray, t_chunk: int = 64) -> np.ndarray:
        """grad_theta[j] = scale_j * sum over chunks c (in order) of the chunk's sum over
        t in [c t_chunk, (c + 1) t_chunk) (in order) of grad[perm^-1(j + t d)], float32."""
        out = np.zeros(self.d, dtype=np.float32)
        for j in range(self.d):
            acc = np.float32(0.0)
            for c0 in range(0, self.count(j), t_chunk):
                part = np.float32(0.0)
                for t in range(c0, min(self.count(j), c0 + t_chunk)):
                    part = np.float32(part + grad[self.perm_inv(j + t * self.d)])
                acc = np.float32(acc + part)
            out[j] = np.float32(acc * self.scale(j))
        return out
