"""The Fastfood projection in torch (docs/SPEC.md section 4): any device, the same bits
as the Rust core.

Each block is ``c_b * H G Π H B x``; blocks are processed a few at a time as rows of a
2-D tensor (about ``CHUNK_ROWS`` values), their sign, Gaussian and permutation
diagonals computed from the block keys with the int64 integer arithmetic of
:mod:`unilora_rs.torch.ops.feistel`. The transform runs stage by stage (``h = 1, 2, 4,
...``), each stage one addition and one subtraction per pair, so every float32
operation is the one the spec fixes; the backward pass adds the blocks' terms in block
order. On CPU the custom operators call the Rust core instead (multi-threaded, the
reference itself); ``backend="torch"`` forces this implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .backends import resolve_backend
from .custom_op import register_rebuild_autograd, seed_from_i64
from .feistel import encrypt, mix32
from .params import FastfoodParams
from .rust import backward_rust, forward_rust

__all__ = ["fastfood_backward", "fastfood_forward", "fwht", "rebuild_fastfood"]

#: Values per chunk of blocks (bounds the temporary memory).
CHUNK_ROWS = 1 << 18
#: The mean of the sum of twelve 16-bit uniforms.
GAUSS_MEAN = 393_210


@dataclass(frozen=True)
class _Perm:
    """The Feistel network of a chunk of blocks: round keys as ``[m, 1]`` tensors."""

    keys: tuple[torch.Tensor, ...]
    wl: int
    wr: int


def fwht(v: torch.Tensor) -> torch.Tensor:
    """The unnormalised Walsh-Hadamard transform of every row of ``v`` (``[m, n]``),
    stage by stage: ``h = 1, 2, 4, ...``, ``(a, b) -> (a + b, a - b)``."""
    m, n = v.shape
    h = 1
    while h < n:
        pairs = v.reshape(m, n // (2 * h), 2, h)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        v = torch.stack((a + b, a - b), dim=2).reshape(m, n)
        h *= 2
    return v


def _blocks(
    p: FastfoodParams, b0: int, b1: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(negative, G, Π, c)`` of blocks ``b0 .. b1 - 1``: ``[m, n]`` bool, ``[m, n]``
    float32, ``[m, n]`` int64 (``Π[i]``) and ``[m, 1]`` float32."""
    keys = torch.from_numpy(p.keys[b0:b1].astype(np.int64)).to(device)
    i = torch.arange(p.n, dtype=torch.int64, device=device)
    k = [keys[:, t : t + 1] for t in range(keys.shape[1])]
    negative = (mix32(i ^ k[4]) >> 31) == 1
    total = torch.zeros((b1 - b0, p.n), dtype=torch.int64, device=device)
    for key in k[5:]:
        h = mix32(i ^ key)
        total += (h & 0xFFFF) + (h >> 16)
    gauss = (total - GAUSS_MEAN).to(torch.float32) / 65536.0
    wl = p.bits // 2
    perm = encrypt(i, _Perm(tuple(k[:4]), wl, p.bits - wl))  # type: ignore[arg-type]
    scales = torch.from_numpy(p.scales[b0:b1]).to(device)[:, None]
    return negative, gauss, perm, scales


def _chunks(p: FastfoodParams) -> range:
    return range(0, p.blocks, max(1, CHUNK_ROWS // p.n))


def fastfood_forward(theta: torch.Tensor, p: FastfoodParams) -> torch.Tensor:
    """``theta_D`` (float32 ``[D]``) from ``theta_d``, on ``theta``'s device."""
    dev = theta.device
    x = torch.zeros(p.n, dtype=torch.float32, device=dev)
    x[: p.d] = theta.detach()
    out = torch.empty(p.total, dtype=torch.float32, device=dev)
    step = max(1, CHUNK_ROWS // p.n)
    for b0 in _chunks(p):
        b1 = min(p.blocks, b0 + step)
        negative, gauss, perm, scales = _blocks(p, b0, b1, dev)
        v = fwht(torch.where(negative, -x, x))
        w = fwht(gauss * torch.gather(v, 1, perm)) * scales
        r0, r1 = b0 * p.n, min(p.total, b1 * p.n)
        out[r0:r1] = w.reshape(-1)[: r1 - r0]
    return out


def fastfood_backward(grad: torch.Tensor, p: FastfoodParams) -> torch.Tensor:
    """``P^T grad`` (float32 ``[d]``): per block ``c_b * B H Π^T G H grad_b``, added in
    block order from zero."""
    dev = grad.device
    grad = grad.detach().to(torch.float32).reshape(-1)
    acc = torch.zeros(p.d, dtype=torch.float32, device=dev)
    step = max(1, CHUNK_ROWS // p.n)
    for b0 in _chunks(p):
        b1 = min(p.blocks, b0 + step)
        negative, gauss, perm, scales = _blocks(p, b0, b1, dev)
        r0, r1 = b0 * p.n, min(p.total, b1 * p.n)
        u = torch.zeros((b1 - b0) * p.n, dtype=torch.float32, device=dev)
        u[: r1 - r0] = grad[r0:r1]
        u = fwht(u.reshape(b1 - b0, p.n))
        z = torch.zeros_like(u).scatter_(1, perm, gauss * u)
        z = fwht(z)
        terms = torch.where(negative, -z, z)[:, : p.d] * scales
        for row in terms:
            acc = acc + row
    return acc


@torch.library.custom_op("unilora_rs::fastfood", mutates_args=())
def _fastfood_op(theta: torch.Tensor, seed: int, total: int, backend: str) -> torch.Tensor:
    p = FastfoodParams.create(seed_from_i64(seed), total, theta.numel())
    if resolve_backend(theta.device, backend) == "rust":
        return forward_rust(theta, p)
    return fastfood_forward(theta, p)


@_fastfood_op.register_fake
def _(theta: torch.Tensor, seed: int, total: int, backend: str) -> torch.Tensor:
    return theta.new_empty(total)


@torch.library.custom_op("unilora_rs::fastfood_backward", mutates_args=())
def _fastfood_backward_op(
    grad: torch.Tensor, seed: int, total: int, d: int, backend: str
) -> torch.Tensor:
    p = FastfoodParams.create(seed_from_i64(seed), total, d)
    grad = grad.contiguous().to(torch.float32)
    if resolve_backend(grad.device, backend) == "rust":
        return backward_rust(grad, p)
    return fastfood_backward(grad, p)


@_fastfood_backward_op.register_fake
def _(grad: torch.Tensor, seed: int, total: int, d: int, backend: str) -> torch.Tensor:
    return grad.new_empty(d, dtype=torch.float32)


register_rebuild_autograd(_fastfood_op, lambda *a: torch.ops.unilora_rs.fastfood_backward(*a))


def rebuild_fastfood(theta: torch.Tensor, seed_i64: int, total: int, backend: str) -> torch.Tensor:
    """``theta_D`` through the differentiable custom operator (Rust on CPU, torch
    elsewhere or with ``backend="torch"``; Triton has no Fastfood kernel, so CUDA
    tensors use this torch implementation)."""
    return torch.ops.unilora_rs.fastfood(theta, seed_i64, total, backend)
