"""Triton kernels of the projection (docs/SPEC.md, spec v1): no index tensor in memory.

* :func:`rebuild_forward`: each program owns a tile of ``LANES * ROWS`` rows; lane ``l``
  walks rows ``l, l + LANES, ...`` of the tile. Every iteration applies the Feistel
  network once to each lane's value; a lane whose value lands in ``[0, D)`` writes
  ``theta_D[i] = theta_d[idx(i)] * scale(i)`` (one float32 multiplication) and moves on
  to its next row, so cycle-walking never leaves lanes idle while others walk.
* :func:`rebuild_backward`: two stages, deterministic and atomic-free. Stage 1 gives
  each (chunk of ``t_chunk`` t values, block of columns) pair to one program; lane
  ``j`` sums ``grad_theta_D[perm^-1(j + t d)]`` over the chunk's t in increasing order
  (walking ``perm^-1`` the same persistent way). Stage 2 adds the chunk sums of each
  column in chunk order and applies the scale: the order of SPEC section 1.4, the same
  bits as the Rust CPU backward.

All integer constants of a projection travel in one small int64 tensor (cached per
projection and device), the scales as float32 scalars: the compiled kernels never
depend on the seed, ``D`` or ``d``, so every adapter shares one compiled forward and one
backward (per ``WIDE``: 32-bit domains use uint32 lanes and a multiply-high division
for ``mod d``; domains above 32 bits use uint64 and ``%``). Every launch runs under
``torch.cuda.device(tensor.device)``. The kernels also run under
``TRITON_INTERPRET=1`` on CPU tensors (used by the tests).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
import triton
import triton.language as tl

from ...errors import InvalidArgumentError
from .params import ProjectionParams

__all__ = ["MAX_GRID", "params_tensor", "rebuild_backward", "rebuild_forward"]

#: Lanes and rows per lane of a forward program (a tile of 8192 rows).
FWD_LANES = 256
FWD_ROWS = 32
FWD_WARPS = 4
#: Columns per program of the backward stages.
BWD_LANES = 256
BWD_WARPS = 4
#: The launcher reads a 1-D grid as a C int.
MAX_GRID = 2**31 - 1

# Positions in the parameter tensor (see params_tensor).
_TOTAL = tl.constexpr(0)
_D = tl.constexpr(1)
_REM = tl.constexpr(2)
_K0 = tl.constexpr(3)
_K1 = tl.constexpr(4)
_K2 = tl.constexpr(5)
_K3 = tl.constexpr(6)
_WR = tl.constexpr(7)
_MASK_L = tl.constexpr(8)
_MASK_R = tl.constexpr(9)
_MAGIC = tl.constexpr(10)
_SHIFT1 = tl.constexpr(11)
_SHIFT2 = tl.constexpr(12)
_T_CHUNK = tl.constexpr(13)
_N_CHUNKS = tl.constexpr(14)
_COL_BLOCKS = tl.constexpr(15)
_N_PARAMS = 16


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0xD35A2D97
    x = x ^ (x >> 15)
    return x


@triton.jit
def _round(left, right, key, mask):
    """One Feistel round: ``(L, R) -> (R, L ^ (mix32(R ^ K) & mask))``."""
    return right, left ^ (_mix32(right ^ key) & mask)


@triton.jit
def _unround(left, right, key, mask):
    """The inverse of :func:`_round`."""
    return right ^ (_mix32(left ^ key) & mask), left


@triton.jit
def _feistel(x, k0, k1, k2, k3, wr, mask_l, mask_r, INVERSE: tl.constexpr):
    """E(x) (4 rounds, widths wl, wr, wl, wr) or, with INVERSE, E^-1(x) (the rounds
    undone, last first); x: uint32 or uint64 lanes."""
    left = (x >> wr).to(tl.uint32)
    right = (x & mask_r.to(x.dtype)).to(tl.uint32)
    if INVERSE:
        left, right = _unround(left, right, k3, mask_r)
        left, right = _unround(left, right, k2, mask_l)
        left, right = _unround(left, right, k1, mask_r)
        left, right = _unround(left, right, k0, mask_l)
    else:
        left, right = _round(left, right, k0, mask_l)
        left, right = _round(left, right, k1, mask_r)
        left, right = _round(left, right, k2, mask_l)
        left, right = _round(left, right, k3, mask_r)
    return (left.to(x.dtype) << wr) | right.to(x.dtype)


@triton.jit
def _prologue(prm_ptr, WIDE: tl.constexpr):
    """The projection's constants from the parameter tensor, in their working types:
    sizes as uint64, keys and masks as uint32, the shift ``wr`` in the lane type."""
    total = tl.load(prm_ptr + _TOTAL).to(tl.uint64)
    d = tl.load(prm_ptr + _D).to(tl.uint64)
    k0 = tl.load(prm_ptr + _K0).to(tl.uint32)
    k1 = tl.load(prm_ptr + _K1).to(tl.uint32)
    k2 = tl.load(prm_ptr + _K2).to(tl.uint32)
    k3 = tl.load(prm_ptr + _K3).to(tl.uint32)
    mask_l = tl.load(prm_ptr + _MASK_L).to(tl.uint32)
    mask_r = tl.load(prm_ptr + _MASK_R).to(tl.uint32)
    if WIDE:  # noqa: SIM108 (a constexpr branch, resolved at compile time)
        wr = tl.load(prm_ptr + _WR).to(tl.uint64)
    else:
        wr = tl.load(prm_ptr + _WR).to(tl.uint32)
    return total, d, k0, k1, k2, k3, wr, mask_l, mask_r


@triton.jit
def _column(y, d, magic, shift1, shift2, WIDE: tl.constexpr):
    """``y mod d``: ``%`` on uint64 lanes, else a multiply-high division (uint32)."""
    if WIDE:
        j = y % d
    else:
        q = tl.umulhi(y, magic)
        q = (q + ((y - q) >> shift1)) >> shift2
        j = y - q * d.to(tl.uint32)
    return j


@triton.jit(do_not_specialize_on_alignment=["theta_ptr"])
def _forward_kernel(
    theta_ptr,
    out_ptr,
    prm_ptr,
    scale_hi,
    scale_lo,
    LANES: tl.constexpr,
    ROWS: tl.constexpr,
    WIDE: tl.constexpr,
):
    total, d, k0, k1, k2, k3, wr, mask_l, mask_r = _prologue(prm_ptr, WIDE)
    rem = tl.load(prm_ptr + _REM)
    magic = tl.load(prm_ptr + _MAGIC).to(tl.uint32)
    shift1 = tl.load(prm_ptr + _SHIFT1).to(tl.uint32)
    shift2 = tl.load(prm_ptr + _SHIFT2).to(tl.uint32)
    tile = tl.program_id(0).to(tl.uint64) * (LANES * ROWS)
    row = tile + tl.arange(0, LANES).to(tl.uint64)
    stop = tl.minimum(tile + LANES * ROWS, total)
    active = row < stop
    if WIDE:  # noqa: SIM108
        x = row
    else:
        x = row.to(tl.uint32)
    last = (total - 1).to(x.dtype)
    rem_x = rem.to(x.dtype)
    while tl.max(active.to(tl.int32), axis=0) > 0:
        x = _feistel(x, k0, k1, k2, k3, wr, mask_l, mask_r, False)
        done = active & (x <= last)
        j = _column(x, d, magic, shift1, shift2, WIDE)
        scale = tl.where(j < rem_x, scale_hi, scale_lo)
        value = tl.load(theta_ptr + j.to(tl.int64), mask=done, other=0.0)
        tl.store(out_ptr + row, value * scale, mask=done)
        # A lane that wrote its row starts on its next one; the others walk on.
        row = tl.where(done, row + LANES, row)
        active = active & (row < stop)
        x = tl.where(done, row.to(x.dtype), x)


@triton.jit(do_not_specialize_on_alignment=["grad_ptr"])
def _backward_chunk_kernel(grad_ptr, part_ptr, prm_ptr, LANES: tl.constexpr, WIDE: tl.constexpr):
    total, d, k0, k1, k2, k3, wr, mask_l, mask_r = _prologue(prm_ptr, WIDE)
    t_chunk = tl.load(prm_ptr + _T_CHUNK).to(tl.uint64)
    col_blocks = tl.load(prm_ptr + _COL_BLOCKS).to(tl.uint64)
    pid = tl.program_id(0).to(tl.uint64)
    chunk = pid // col_blocks
    cols = (pid % col_blocks) * LANES + tl.arange(0, LANES).to(tl.uint64)
    col_ok = cols < d
    # Lane j visits y = j + t d for the chunk's t, in increasing order.
    y = cols + chunk * t_chunk * d
    y_stop = tl.minimum(y + t_chunk * d, total)
    active = col_ok & (y < y_stop)
    if WIDE:  # noqa: SIM108
        x = y
    else:
        x = y.to(tl.uint32)
    last = (total - 1).to(x.dtype)
    acc = tl.zeros([LANES], dtype=tl.float32)
    while tl.max(active.to(tl.int32), axis=0) > 0:
        x = _feistel(x, k0, k1, k2, k3, wr, mask_l, mask_r, True)
        done = active & (x <= last)
        g = tl.load(grad_ptr + x.to(tl.int64), mask=done, other=0.0)
        acc = tl.where(done, acc + g, acc)
        y = tl.where(done, y + d, y)
        active = active & (y < y_stop)
        x = tl.where(done, y.to(x.dtype), x)
    tl.store(part_ptr + chunk * d + cols, acc, mask=col_ok)


@triton.jit
def _backward_sum_kernel(part_ptr, out_ptr, prm_ptr, scale_hi, scale_lo, LANES: tl.constexpr):
    d = tl.load(prm_ptr + _D)
    rem = tl.load(prm_ptr + _REM)
    n_chunks = tl.load(prm_ptr + _N_CHUNKS)
    cols = tl.program_id(0).to(tl.int64) * LANES + tl.arange(0, LANES).to(tl.int64)
    ok = cols < d
    acc = tl.zeros([LANES], dtype=tl.float32)
    for c in range(0, n_chunks):
        acc += tl.load(part_ptr + c * d + cols, mask=ok, other=0.0)
    scale = tl.where(cols < rem, scale_hi, scale_lo)
    tl.store(out_ptr + cols, acc * scale, mask=ok)


# ---------------------------------------------------------------------------------------------
# Launch sites
# ---------------------------------------------------------------------------------------------

_PARAMS: OrderedDict[tuple[int, int, int, str], torch.Tensor] = OrderedDict()
_PARAMS_CACHE_SIZE = 64


def _param_values(p: ProjectionParams) -> list[int]:
    """The integer constants of ``p`` in the order of the ``_TOTAL`` ... positions."""
    col_blocks = triton.cdiv(p.d, BWD_LANES)
    values = [
        p.total,
        p.d,
        p.rem,
        *p.keys,
        p.wr,
        (1 << p.wl) - 1,
        (1 << p.wr) - 1,
        p.div_magic,
        p.div_shift1,
        p.div_shift2,
        p.t_chunk,
        p.n_chunks,
        col_blocks,
    ]
    assert len(values) == _N_PARAMS
    return values


def params_tensor(p: ProjectionParams, device: torch.device) -> torch.Tensor:
    """The int64 parameter tensor of ``p`` on ``device`` (cached per projection and device)."""
    key = (p.seed, p.total, p.d, str(device))
    prm = _PARAMS.get(key)
    if prm is None:
        prm = torch.tensor(_param_values(p), dtype=torch.int64, device=device)
        _PARAMS[key] = prm
        if len(_PARAMS) > _PARAMS_CACHE_SIZE:
            _PARAMS.popitem(last=False)
    else:
        _PARAMS.move_to_end(key)
    return prm


def _device_guard(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """``torch.cuda.device(device)`` for CUDA tensors (Triton launches on the current
    device), nothing for the interpreter's CPU tensors."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _launch(
    kernel: Any, grid: tuple[int, ...], device: torch.device, args: tuple, meta: dict
) -> None:
    """Launches ``kernel`` on ``grid`` with ``args`` and ``meta`` under ``device``."""
    with _device_guard(device):
        kernel[grid](*args, **meta)


# No fused multiply-add anywhere: every product and sum is rounded as the spec says.
_OPTIONS_FWD = {"num_warps": FWD_WARPS, "enable_fp_fusion": False}
_OPTIONS_BWD = {"num_warps": BWD_WARPS, "enable_fp_fusion": False}


def _check_grid(programs: int, what: str) -> int:
    if programs > MAX_GRID:
        raise InvalidArgumentError(
            f"{what} needs {programs:,} programs, more than one launch covers ({MAX_GRID:,}); "
            "the projection is too large for the Triton kernels"
        )
    return programs


def forward_grid(p: ProjectionParams) -> tuple[int]:
    """The forward launch's grid; raises when one launch cannot cover ``D``."""
    return (_check_grid(triton.cdiv(p.total, FWD_LANES * FWD_ROWS), "the forward pass"),)


def backward_grids(p: ProjectionParams) -> tuple[tuple[int], tuple[int]]:
    """The grids of the two backward stages; raises when one launch cannot cover them."""
    blocks = triton.cdiv(p.d, BWD_LANES)
    return (_check_grid(blocks * p.n_chunks, "the backward pass"),), (blocks,)


def forward_launch(
    theta: Any, out: Any, prm: Any, p: ProjectionParams
) -> tuple[Any, tuple[int], tuple, dict]:
    """``(kernel, grid, args, meta)`` of the forward launch (used by the AOT test too)."""
    grid = forward_grid(p)
    meta = {"LANES": FWD_LANES, "ROWS": FWD_ROWS, "WIDE": not p.narrow, **_OPTIONS_FWD}
    return _forward_kernel, grid, (theta, out, prm, p.scale_hi, p.scale_lo), meta


def backward_launches(
    grad: Any, part: Any, out: Any, prm: Any, p: ProjectionParams
) -> Iterator[tuple[Any, tuple[int], tuple, dict]]:
    """The two launches of the backward pass, as :func:`forward_launch`."""
    grid, sum_grid = backward_grids(p)
    meta = {"LANES": BWD_LANES, "WIDE": not p.narrow, **_OPTIONS_BWD}
    yield _backward_chunk_kernel, grid, (grad, part, prm), meta
    meta = {"LANES": BWD_LANES, **_OPTIONS_BWD}
    yield _backward_sum_kernel, sum_grid, (part, out, prm, p.scale_hi, p.scale_lo), meta


def rebuild_forward(theta: torch.Tensor, p: ProjectionParams) -> torch.Tensor:
    """``theta_D`` (float32 ``[D]``) from ``theta_d`` (float32 ``[d]``), indices from the seed."""
    forward_grid(p)  # refuse before allocating
    theta = theta.contiguous()
    out = torch.empty(p.total, dtype=torch.float32, device=theta.device)
    kernel, grid, args, meta = forward_launch(theta, out, params_tensor(p, theta.device), p)
    _launch(kernel, grid, theta.device, args, meta)
    return out


def rebuild_backward(grad: torch.Tensor, p: ProjectionParams) -> torch.Tensor:
    """``grad_theta_d = P^T grad_theta_D``, atomic-free and deterministic."""
    backward_grids(p)  # refuse before allocating
    grad = grad.contiguous()
    dev = grad.device
    part = torch.empty((p.n_chunks, p.d), dtype=torch.float32, device=dev)
    out = torch.empty(p.d, dtype=torch.float32, device=dev)
    for kernel, grid, args, meta in backward_launches(grad, part, out, params_tensor(p, dev), p):
        _launch(kernel, grid, dev, args, meta)
    return out
