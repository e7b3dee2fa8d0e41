"""Triton kernels of the projection (docs/SPEC.md, spec v1): no index tensor in memory.

* :func:`rebuild_forward`: each program computes ``idx(i)`` for a block of rows from the
  seed (Feistel network with cycle-walking, uint32 halves in a uint64 domain) and writes
  ``theta_D[i] = theta_d[idx(i)] * scale(i)`` (one float32 multiplication).
* :func:`rebuild_backward`: each program owns a block of columns ``j`` and walks
  ``t = 0 .. n_j - 1`` through the inverse permutation, summing
  ``grad_theta_D[perm^-1(j + t d)]`` in that order; no atomics, deterministic.

The kernels also run under ``TRITON_INTERPRET=1`` on CPU tensors (used by the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kernels import ProjectionParams

__all__ = ["rebuild_backward", "rebuild_forward"]

_FWD_BLOCK = 1024
_BWD_BLOCK = 256


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0xD35A2D97
    x = x ^ (x >> 15)
    return x


@triton.jit
def _encrypt(x, k0, k1, k2, k3, wr, mask_l, mask_r):
    """One pass of the 4-round Feistel network on the k-bit domain (uint64 in and out)."""
    left = (x >> wr).to(tl.uint32)
    right = (x & mask_r.to(tl.uint64)).to(tl.uint32)
    # Round r uses mask(a) with a = wl, wr, wl, wr (the widths swap every round).
    f = _mix32(right ^ k0) & mask_l
    left, right = right, left ^ f
    f = _mix32(right ^ k1) & mask_r
    left, right = right, left ^ f
    f = _mix32(right ^ k2) & mask_l
    left, right = right, left ^ f
    f = _mix32(right ^ k3) & mask_r
    left, right = right, left ^ f
    return (left.to(tl.uint64) << wr) | right.to(tl.uint64)


@triton.jit
def _decrypt(y, k0, k1, k2, k3, wr, mask_l, mask_r):
    """Inverse of :func:`_encrypt`."""
    left = (y >> wr).to(tl.uint32)
    right = (y & mask_r.to(tl.uint64)).to(tl.uint32)
    prev_r = left
    left = right ^ (_mix32(prev_r ^ k3) & mask_r)
    right = prev_r
    prev_r = left
    left = right ^ (_mix32(prev_r ^ k2) & mask_l)
    right = prev_r
    prev_r = left
    left = right ^ (_mix32(prev_r ^ k1) & mask_r)
    right = prev_r
    prev_r = left
    left = right ^ (_mix32(prev_r ^ k0) & mask_l)
    right = prev_r
    return (left.to(tl.uint64) << wr) | right.to(tl.uint64)


_SCALARS = ["total", "d", "rem", "n_t", "k0", "k1", "k2", "k3", "wr", "mask_l", "mask_r"]


@triton.jit(do_not_specialize=_SCALARS[:3] + _SCALARS[4:])
def _forward_kernel(
    theta_ptr,
    out_ptr,
    total,
    d,
    rem,
    k0,
    k1,
    k2,
    k3,
    wr,
    mask_l,
    mask_r,
    scale_hi,
    scale_lo,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    total64 = tl.cast(total, tl.uint64)
    d64 = tl.cast(d, tl.uint64)
    rem64 = tl.cast(rem, tl.uint64)
    ka = tl.cast(k0, tl.uint32)
    kb = tl.cast(k1, tl.uint32)
    kc = tl.cast(k2, tl.uint32)
    kd = tl.cast(k3, tl.uint32)
    w = tl.cast(wr, tl.uint64)
    ml = tl.cast(mask_l, tl.uint32)
    mr = tl.cast(mask_r, tl.uint32)
    rows = pid.to(tl.uint64) * BLOCK + tl.arange(0, BLOCK).to(tl.uint64)
    valid = rows < total64
    rows = tl.where(valid, rows, 0)
    x = _encrypt(rows, ka, kb, kc, kd, w, ml, mr)
    pending = x >= total64
    while tl.max(pending.to(tl.int32), axis=0) > 0:
        x = tl.where(pending, _encrypt(x, ka, kb, kc, kd, w, ml, mr), x)
        pending = x >= total64
    j = x % d64
    scale = tl.where(j < rem64, scale_hi, scale_lo)
    vals = tl.load(theta_ptr + j, mask=valid, other=0.0)
    tl.store(out_ptr + rows, vals * scale, mask=valid)


@triton.jit(do_not_specialize=_SCALARS)
def _backward_kernel(
    grad_ptr,
    out_ptr,
    total,
    d,
    rem,
    n_t,
    k0,
    k1,
    k2,
    k3,
    wr,
    mask_l,
    mask_r,
    scale_hi,
    scale_lo,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    total64 = tl.cast(total, tl.uint64)
    d64 = tl.cast(d, tl.uint64)
    rem64 = tl.cast(rem, tl.uint64)
    ka = tl.cast(k0, tl.uint32)
    kb = tl.cast(k1, tl.uint32)
    kc = tl.cast(k2, tl.uint32)
    kd = tl.cast(k3, tl.uint32)
    w = tl.cast(wr, tl.uint64)
    ml = tl.cast(mask_l, tl.uint32)
    mr = tl.cast(mask_r, tl.uint32)
    cols = pid.to(tl.uint64) * BLOCK + tl.arange(0, BLOCK).to(tl.uint64)
    col_ok = cols < d64
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for t in range(0, n_t):
        y = cols + tl.cast(t, tl.uint64) * d64
        ok = col_ok & (y < total64)
        y = tl.where(ok, y, 0)
        x = _decrypt(y, ka, kb, kc, kd, w, ml, mr)
        pending = x >= total64
        while tl.max(pending.to(tl.int32), axis=0) > 0:
            x = tl.where(pending, _decrypt(x, ka, kb, kc, kd, w, ml, mr), x)
            pending = x >= total64
        acc += tl.load(grad_ptr + x, mask=ok, other=0.0)
    scale = tl.where(cols < rem64, scale_hi, scale_lo)
    tl.store(out_ptr + cols, acc * scale, mask=col_ok)


def _consts(p: ProjectionParams) -> tuple[int, ...]:
    # Python ints; the kernels cast them to their working types.
    return (*p.keys, p.wr, (1 << p.wl) - 1, (1 << p.wr) - 1)


def rebuild_forward(theta: torch.Tensor, p: ProjectionParams) -> torch.Tensor:
    """``theta_D`` (float32 ``[D]``) from ``theta_d`` (float32 ``[d]``), indices from the seed."""
    theta = theta.contiguous()
    out = torch.empty(p.total, dtype=torch.float32, device=theta.device)
    grid = (triton.cdiv(p.total, _FWD_BLOCK),)
    _forward_kernel[grid](
        theta, out, p.total, p.d, p.rem, *_consts(p), p.scale_hi, p.scale_lo, BLOCK=_FWD_BLOCK
    )
    return out


def rebuild_backward(grad: torch.Tensor, p: ProjectionParams) -> torch.Tensor:
    """``grad_theta_d = P^T grad_theta_D``, atomic-free and deterministic."""
    grad = grad.contiguous()
    out = torch.empty(p.d, dtype=torch.float32, device=grad.device)
    n_t = p.q + (1 if p.rem else 0)
    grid = (triton.cdiv(p.d, _BWD_BLOCK),)
    _backward_kernel[grid](
        grad, out, p.total, p.d, p.rem, n_t, *_consts(p), p.scale_hi, p.scale_lo, BLOCK=_BWD_BLOCK
    )
    return out
