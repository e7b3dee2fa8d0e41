"""Rebuilding ``theta_D = P theta_d`` inside torch: the projection of docs/SPEC.md on any device.

Two index modes:

* ``"on_the_fly"`` (default): the column ``idx(i)`` of every row is computed from the
  seed during the forward pass and again during the backward pass; no index tensor is
  kept in memory. On CUDA the Triton kernels of :mod:`unilora_rs.torch.triton_kernels`
  do this inside the gather (forward) and inside an atomic-free, deterministic
  gather-sum over the inverse permutation (backward). Elsewhere (or with
  ``backend="torch"``) the same integer arithmetic runs as int64 torch operations, in
  chunks, with the same deterministic inverse-enumeration backward.
* ``"cached"``: the int32 map is built once per device and kept as a tensor; the
  forward is a gather and the backward an ``index_add_`` (for comparison).

Both modes produce ``theta_D[i] = theta_d[idx(i)] * scale(i)`` with ONE float32
multiplication, bit for bit equal to :func:`unilora_rs.reconstruct`.

The rebuild is a ``torch.library`` custom operator with a registered autograd formula
and a fake (meta) implementation, so ``torch.compile`` sees one opaque node without
graph breaks and DDP / gradient checkpointing treat it like any other differentiable op.
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import torch

from ..errors import InvalidArgumentError
from .params import ProjectionParams

__all__ = [
    "BACKENDS",
    "INDEX_MODES",
    "ProjectionParams",
    "build_index_map",
    "column_index",
    "inverse_permute",
    "permute",
    "rebuild",
    "rebuild_backward_reference",
    "resolve_backend",
    "triton_available",
]

INDEX_MODES = ("on_the_fly", "cached")
BACKENDS = ("auto", "triton", "rust", "torch")

_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1
_MIX_C1 = 0x21F0AAAD
_MIX_C2 = 0xD35A2D97
#: Rows per chunk of the torch fallback (bounds its temporary int64 memory).
CHUNK_ROWS = 1 << 18


# ---------------------------------------------------------------------------------------------
# int64 torch implementation of the generator (any device)
# ---------------------------------------------------------------------------------------------


def _mul_u32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2^32`` for ``x`` in ``[0, 2^32)`` held in int64, without int64 overflow."""
    lo = x * (c & 0xFFFF)  # < 2^48
    hi = (x * (c >> 16)) & 0xFFFF  # only the low 16 bits survive the shift by 16
    return (lo + (hi << 16)) & _U32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul_u32(x, _MIX_C1)
    x = x ^ (x >> 15)
    x = _mul_u32(x, _MIX_C2)
    return x ^ (x >> 15)


def _encrypt(x: torch.Tensor, p: ProjectionParams) -> torch.Tensor:
    a, b = p.wl, p.wr
    left = x >> b
    right = x & ((1 << b) - 1)
    for key in p.keys:
        f = _mix32(right ^ key) & ((1 << a) - 1)
        left, right = right, left ^ f
        a, b = b, a
    return (left << b) | right


def _decrypt(y: torch.Tensor, p: ProjectionParams) -> torch.Tensor:
    a, b = p.wl, p.wr
    left = y >> b
    right = y & ((1 << b) - 1)
    for key in reversed(p.keys):
        a, b = b, a
        prev_r = left
        left = right ^ (_mix32(prev_r ^ key) & ((1 << a) - 1))
        right = prev_r
    return (left << b) | right


def _walk(x: torch.Tensor, p: ProjectionParams, step: object) -> torch.Tensor:
    """Cycle-walking: re-applies ``step`` to the entries still outside ``[0, D)``."""
    out = step(x, p)  # type: ignore[operator]
    pending = torch.nonzero(out >= p.total).squeeze(1)
    while pending.numel():
        vals = step(out[pending], p)  # type: ignore[operator]
        out[pending] = vals
        pending = pending[vals >= p.total]
    return out


def permute(i: torch.Tensor, p: ProjectionParams) -> torch.Tensor:
    """``perm(i)`` for an int64 tensor of rows in ``[0, D)``."""
    return _walk(i, p, _encrypt)


def inverse_permute(y: torch.Tensor, p: ProjectionParams) -> torch.Tensor:
    """``perm^-1(y)`` for an int64 tensor of images in ``[0, D)``."""
    return _walk(y, p, _decrypt)


def column_index(i: torch.Tensor, p: ProjectionParams) -> torch.Tensor:
    """``idx(i) = perm(i) mod d`` (int64)."""
    return permute(i, p) % p.d


def _row_scale(j: torch.Tensor, p: ProjectionParams) -> torch.Tensor:
    hi = torch.tensor(p.scale_hi, dtype=torch.float32, device=j.device)
    lo = torch.tensor(p.scale_lo, dtype=torch.float32, device=j.device)
    return torch.where(j < p.rem, hi, lo)


def _column_scales(p: ProjectionParams, device: torch.device) -> torch.Tensor:
    return _row_scale(torch.arange(p.d, device=device), p)


def build_index_map(p: ProjectionParams, device: torch.device | str) -> torch.Tensor:
    """The explicit int32 map ``idx`` (length ``D``) on ``device``, for the cached mode."""
    if p.d > 2**31:
        raise InvalidArgumentError(f"the cached int32 map needs d <= 2^31, got d = {p.d}")
    if torch.device(device).type == "cpu":
        from .. import _core

        idx, _ = _core.projection(p.seed, p.total, p.d)
        return torch.from_numpy(idx).to(torch.int32)
    out = torch.empty(p.total, dtype=torch.int32, device=device)
    for start in range(0, p.total, CHUNK_ROWS):
        stop = min(p.total, start + CHUNK_ROWS)
        rows = torch.arange(start, stop, dtype=torch.int64, device=device)
        out[start:stop] = column_index(rows, p).to(torch.int32)
    return out


def _forward_torch(theta: torch.Tensor, p: ProjectionParams) -> torch.Tensor:
    out = torch.empty(p.total, dtype=torch.float32, device=theta.device)
    for start in range(0, p.total, CHUNK_ROWS):
        stop = min(p.total, start + CHUNK_ROWS)
        j = column_index(torch.arange(start, stop, dtype=torch.int64, device=theta.device), p)
        torch.mul(theta[j], _row_scale(j, p), out=out[start:stop])
    return out


def _backward_torch(grad: torch.Tensor, p: ProjectionParams) -> torch.Tensor:
    """``P^T grad`` in the order of docs/SPEC.md section 1.4: deterministic, no atomics.

    The images ``y = j + t d`` are gathered through ``perm^-1`` a block of ``t`` at a
    time. Each chunk of ``t_chunk`` consecutive ``t`` is summed in increasing ``t``
    from zero (one float32 addition per step, vectorised over columns and chunks), the
    chunk sums are added in chunk order, and the total is scaled once.
    """
    d, total, t_chunk = p.d, p.total, p.t_chunk
    n_t = p.n_t
    dev = grad.device
    acc = torch.zeros(d, dtype=torch.float32, device=dev)
    # t values per step: whole chunks when a chunk is small, else a power of two that
    # divides t_chunk (so a step never straddles two chunks).
    span = max(1, CHUNK_ROWS // d)
    span = span // t_chunk * t_chunk if span >= t_chunk else 1 << (span.bit_length() - 1)
    part = torch.zeros(d, dtype=torch.float32, device=dev)
    for t0 in range(0, n_t, span):
        t1 = min(n_t, t0 + span)
        y1 = min(total, t1 * d)
        rows = inverse_permute(torch.arange(t0 * d, y1, dtype=torch.int64, device=dev), p)
        g = grad[rows]
        if span >= t_chunk:
            n_c = -(-(t1 - t0) // t_chunk)
            g = torch.cat([g, g.new_zeros(n_c * t_chunk * d - g.numel())])
            g = g.view(n_c, t_chunk, d)
            sums = torch.zeros(n_c, d, dtype=torch.float32, device=dev)
            for s in range(t_chunk):
                sums += g[:, s]
            for c in range(n_c):
                acc += sums[c]
        else:
            g = torch.cat([g, g.new_zeros((t1 - t0) * d - g.numel())]).view(t1 - t0, d)
            for s in range(t1 - t0):
                part += g[s]
            if t1 % t_chunk == 0 or t1 == n_t:
                acc += part
                part.zero_()
    return acc * _column_scales(p, dev)


# ---------------------------------------------------------------------------------------------
# Triton dispatch
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when Triton can be imported (CUDA kernels; ``TRITON_INTERPRET=1`` runs them on CPU)."""
    try:
        from . import triton_kernels  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(device: torch.device, backend: str) -> str:
    """The kernel family used for tensors on ``device``: ``"triton"``, ``"rust"`` or ``"torch"``.

    ``"auto"`` picks Triton on CUDA (when importable), the Rust core on CPU and the int64
    torch implementation elsewhere. ``"triton"`` on a CPU tensor needs ``TRITON_INTERPRET=1``.
    """
    if backend not in BACKENDS:
        raise InvalidArgumentError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        return "rust" if device.type == "cpu" else "torch"
    if backend == "triton" and not (
        triton_available() and (device.type == "cuda" or _triton_interpret())
    ):
        raise InvalidArgumentError(
            f"backend='triton' needs Triton and a CUDA tensor (got device {device}); "
            "use backend='auto' or 'torch'"
        )
    if backend == "rust" and device.type != "cpu":
        raise InvalidArgumentError(f"backend='rust' runs on CPU tensors only (got device {device})")
    return backend


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _numpy_view(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor through DLPack. ``Tensor.numpy()`` would mark the
    storage non-resizable for good, and FSDP2 frees the storage of its all-gathered
    parameters (``theta_d`` in a sharded root) by resizing it to zero."""
    return np.from_dlpack(t.detach().contiguous())


def _forward_rust(theta: torch.Tensor, p: ProjectionParams) -> torch.Tensor:
    from .. import _core

    vec = _numpy_view(theta)
    (out,) = _core.reconstruct(vec, p.seed, [(p.total, 1)])
    return torch.from_numpy(out.reshape(-1))


def _backward_rust(grad: torch.Tensor, p: ProjectionParams) -> torch.Tensor:
    """CPU backward: ``P^T grad`` in the Rust core, summed over the inverse enumeration in
    the same order as the Triton kernel (no index map, no atomics, GIL released)."""
    from .. import _core

    g = _numpy_view(grad.to(torch.float32))
    return torch.from_numpy(_core.reconstruct_backward(g, p.seed, p.d))


# ---------------------------------------------------------------------------------------------
# Custom operators
# ---------------------------------------------------------------------------------------------


def _seed_to_i64(seed: int) -> int:
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def _seed_from_i64(seed: int) -> int:
    return seed & _U64


@torch.library.custom_op("unilora_rs::rebuild", mutates_args=())
def _rebuild_op(theta: torch.Tensor, seed: int, total: int, backend: str) -> torch.Tensor:
    p = ProjectionParams.create(_seed_from_i64(seed), total, theta.numel())
    kind = resolve_backend(theta.device, backend)
    if kind == "triton":
        from .triton_kernels import rebuild_forward

        return rebuild_forward(theta, p)
    if kind == "rust":
        return _forward_rust(theta, p)
    return _forward_torch(theta, p)


@_rebuild_op.register_fake
def _(theta: torch.Tensor, seed: int, total: int, backend: str) -> torch.Tensor:
    return theta.new_empty(total)


@torch.library.custom_op("unilora_rs::rebuild_backward", mutates_args=())
def _rebuild_backward_op(
    grad: torch.Tensor, seed: int, total: int, d: int, backend: str
) -> torch.Tensor:
    p = ProjectionParams.create(_seed_from_i64(seed), total, d)
    grad = grad.contiguous().to(torch.float32)
    kind = resolve_backend(grad.device, backend)
    if kind == "triton":
        from .triton_kernels import rebuild_backward

        return rebuild_backward(grad, p)
    if kind == "rust":
        return _backward_rust(grad, p)
    return _backward_torch(grad, p)


@_rebuild_backward_op.register_fake
def _(grad: torch.Tensor, seed: int, total: int, d: int, backend: str) -> torch.Tensor:
    return grad.new_empty(d, dtype=torch.float32)


def _rebuild_setup(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: object) -> None:
    theta, seed, total, backend = inputs
    ctx.seed, ctx.total, ctx.d, ctx.backend = seed, total, theta.numel(), backend  # type: ignore[attr-defined]


def _rebuild_grad(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
    g = torch.ops.unilora_rs.rebuild_backward(grad, ctx.seed, ctx.total, ctx.d, ctx.backend)  # type: ignore[attr-defined]
    return g, None, None, None


_rebuild_op.register_autograd(_rebuild_grad, setup_context=_rebuild_setup)


@torch.library.custom_op("unilora_rs::gather", mutates_args=())
def _gather_op(
    theta: torch.Tensor, index: torch.Tensor, rem: int, scale_hi: float, scale_lo: float
) -> torch.Tensor:
    j = index.long()
    hi = torch.tensor(scale_hi, dtype=torch.float32, device=theta.device)
    lo = torch.tensor(scale_lo, dtype=torch.float32, device=theta.device)
    return theta[j] * torch.where(j < rem, hi, lo)


@_gather_op.register_fake
def _(
    theta: torch.Tensor, index: torch.Tensor, rem: int, scale_hi: float, scale_lo: float
) -> torch.Tensor:
    return theta.new_empty(index.shape[0])


def _gather_setup(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: object) -> None:
    theta, index, rem, scale_hi, scale_lo = inputs
    ctx.save_for_backward(index)
    ctx.d, ctx.rem, ctx.hi, ctx.lo = theta.numel(), rem, scale_hi, scale_lo  # type: ignore[attr-defined]


def _gather_grad(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
    (index,) = ctx.saved_tensors  # type: ignore[attr-defined]
    d = ctx.d  # type: ignore[attr-defined]
    acc = torch.zeros(d, dtype=torch.float32, device=grad.device)
    acc.index_add_(0, index, grad.to(torch.float32))
    j = torch.arange(d, device=grad.device)
    hi = torch.tensor(ctx.hi, dtype=torch.float32, device=grad.device)  # type: ignore[attr-defined]
    lo = torch.tensor(ctx.lo, dtype=torch.float32, device=grad.device)  # type: ignore[attr-defined]
    return acc * torch.where(j < ctx.rem, hi, lo), None, None, None, None  # type: ignore[attr-defined]


_gather_op.register_autograd(_gather_grad, setup_context=_gather_setup)


def rebuild(
    theta: torch.Tensor,
    p: ProjectionParams,
    *,
    index: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``theta_D`` (float32, length ``D``) from ``theta_d``; differentiable.

    With ``index`` (the int32 map from :func:`build_index_map`) the cached mode is used;
    without it, indices are computed from the seed on the fly.
    """
    resolve_backend(theta.device, backend)  # validates the name early
    if theta.dim() != 1 or theta.numel() != p.d:
        raise InvalidArgumentError(
            f"theta_d must be 1-D of length d = {p.d}, got {tuple(theta.shape)}"
        )
    if theta.dtype != torch.float32:
        raise InvalidArgumentError(
            f"theta_d must be float32, got {theta.dtype} (under FSDP2 a MixedPrecisionPolicy "
            "casts it: put theta_d in its own unit with param_dtype=torch.float32, see "
            "docs/TRAINING.md)"
        )
    if index is not None:
        return torch.ops.unilora_rs.gather(theta, index, p.rem, p.scale_hi, p.scale_lo)
    return torch.ops.unilora_rs.rebuild(theta, _seed_to_i64(p.seed), p.total, backend)


def rebuild_backward_reference(grad: torch.Tensor, p: ProjectionParams) -> torch.Tensor:
    """The torch (non-Triton) backward, exposed for parity tests."""
    return _backward_torch(grad.to(torch.float32), p)
