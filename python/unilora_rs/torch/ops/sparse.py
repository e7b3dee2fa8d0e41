"""The sparse projection of spec v1 in torch: ``theta_D[i] = theta_d[idx(i)] * scale(i)``.

Two index modes:

* ``"on_the_fly"`` (default): the column ``idx(i)`` of every row is computed from the
  seed during the forward pass and again during the backward pass; no index tensor is
  kept in memory. On CUDA the Triton kernels of :mod:`unilora_rs.torch.ops.triton`
  do this inside the gather (forward) and inside an atomic-free, deterministic
  gather-sum over the inverse permutation (backward). On CPU the Rust core does it
  (:mod:`unilora_rs.torch.ops.rust`). Elsewhere (or with ``backend="torch"``) the same
  integer arithmetic runs as int64 torch operations (:mod:`unilora_rs.torch.ops.feistel`),
  in chunks, with the same deterministic inverse-enumeration backward.
* ``"cached"``: the int32 map is built once per device and kept as a tensor; the
  forward is a gather and the backward an ``index_add_`` (for comparison).

Both modes produce ``theta_D[i] = theta_d[idx(i)] * scale(i)`` with ONE float32
multiplication, bit for bit equal to :func:`unilora_rs.reconstruct`. Each mode is a
``torch.library`` custom operator with a registered autograd formula and a fake (meta)
implementation.
"""

from __future__ import annotations

import torch

from ...errors import InvalidArgumentError
from .backends import resolve_backend
from .custom_op import register_rebuild_autograd, seed_from_i64, seed_to_i64
from .feistel import column_index, inverse_permute
from .params import Params, ProjectionParams
from .rust import backward_rust, forward_rust, index_map_rust

__all__ = [
    "CHUNK_ROWS",
    "INDEX_MODES",
    "build_index_map",
    "rebuild_backward_reference",
    "rebuild_sparse",
]

INDEX_MODES = ("on_the_fly", "cached")
#: Rows per chunk of the torch fallback (bounds its temporary int64 memory).
CHUNK_ROWS = 1 << 18


def _row_scale(j: torch.Tensor, p: ProjectionParams) -> torch.Tensor:
    hi = torch.tensor(p.scale_hi, dtype=torch.float32, device=j.device)
    lo = torch.tensor(p.scale_lo, dtype=torch.float32, device=j.device)
    return torch.where(j < p.rem, hi, lo)


def _column_scales(p: ProjectionParams, device: torch.device) -> torch.Tensor:
    return _row_scale(torch.arange(p.d, device=device), p)


def build_index_map(p: Params, device: torch.device | str) -> torch.Tensor:
    """The explicit int32 map ``idx`` (length ``D``) on ``device``, for the cached mode."""
    if not isinstance(p, ProjectionParams):
        raise InvalidArgumentError(
            f"index_mode='cached' keeps the sparse projection's map; projection {p.kind!r} "
            "has no index map to cache (use index_mode='on_the_fly')"
        )
    if p.d > 2**31:
        raise InvalidArgumentError(f"the cached int32 map needs d <= 2^31, got d = {p.d}")
    if torch.device(device).type == "cpu":
        return index_map_rust(p)
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


@torch.library.custom_op("unilora_rs::rebuild", mutates_args=())
def _rebuild_op(theta: torch.Tensor, seed: int, total: int, backend: str) -> torch.Tensor:
    p = ProjectionParams.create(seed_from_i64(seed), total, theta.numel())
    kind = resolve_backend(theta.device, backend)
    if kind == "triton":
        from .triton import rebuild_forward

        return rebuild_forward(theta, p)
    if kind == "rust":
        return forward_rust(theta, p)
    return _forward_torch(theta, p)


@_rebuild_op.register_fake
def _(theta: torch.Tensor, seed: int, total: int, backend: str) -> torch.Tensor:
    return theta.new_empty(total)


@torch.library.custom_op("unilora_rs::rebuild_backward", mutates_args=())
def _rebuild_backward_op(
    grad: torch.Tensor, seed: int, total: int, d: int, backend: str
) -> torch.Tensor:
    p = ProjectionParams.create(seed_from_i64(seed), total, d)
    grad = grad.contiguous().to(torch.float32)
    kind = resolve_backend(grad.device, backend)
    if kind == "triton":
        from .triton import rebuild_backward

        return rebuild_backward(grad, p)
    if kind == "rust":
        return backward_rust(grad, p)
    return _backward_torch(grad, p)


@_rebuild_backward_op.register_fake
def _(grad: torch.Tensor, seed: int, total: int, d: int, backend: str) -> torch.Tensor:
    return grad.new_empty(d, dtype=torch.float32)


register_rebuild_autograd(_rebuild_op, lambda *a: torch.ops.unilora_rs.rebuild_backward(*a))


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


def rebuild_sparse(
    theta: torch.Tensor, p: ProjectionParams, index: torch.Tensor | None, backend: str
) -> torch.Tensor:
    """``theta_D`` of the sparse map through its custom operator: a gather of the
    cached int32 map ``index``, or (without it) indices computed from the seed."""
    if index is not None:
        return torch.ops.unilora_rs.gather(theta, index, p.rem, p.scale_hi, p.scale_lo)
    return torch.ops.unilora_rs.rebuild(theta, seed_to_i64(p.seed), p.total, backend)


def rebuild_backward_reference(grad: torch.Tensor, p: ProjectionParams) -> torch.Tensor:
    """The torch (non-Triton) backward, exposed for parity tests."""
    return _backward_torch(grad.to(torch.float32), p)
