"""The Rust core as a kernel family: forward and backward of a generated projection
(sparse or Fastfood) on CPU tensors, and the sparse map's int32 index map, through
:mod:`unilora_rs._core` (GIL released)."""

from __future__ import annotations

import numpy as np
import torch

from .params import FastfoodParams, ProjectionParams

__all__ = ["backward_rust", "forward_rust", "index_map_rust"]


def _numpy_view(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor through DLPack. ``Tensor.numpy()`` would mark the
    storage non-resizable for good, and FSDP2 frees the storage of its all-gathered
    parameters (``theta_d`` in a sharded root) by resizing it to zero."""
    return np.from_dlpack(t.detach().contiguous())


def forward_rust(theta: torch.Tensor, p: ProjectionParams | FastfoodParams) -> torch.Tensor:
    """``theta_D`` (float32 ``[D]``) from a CPU ``theta_d``, in the Rust core."""
    from ... import _core

    vec = _numpy_view(theta)
    (out,) = _core.reconstruct(vec, p.seed, [(p.total, 1)], projection=p.kind)
    return torch.from_numpy(out.reshape(-1))


def backward_rust(grad: torch.Tensor, p: ProjectionParams | FastfoodParams) -> torch.Tensor:
    """CPU backward: ``P^T grad`` in the Rust core (for the sparse map, summed over the
    inverse enumeration in the same order as the Triton kernel: no index map, no
    atomics; GIL released)."""
    from ... import _core

    g = _numpy_view(grad.to(torch.float32))
    return torch.from_numpy(_core.reconstruct_backward(g, p.seed, p.d, projection=p.kind))


def index_map_rust(p: ProjectionParams) -> torch.Tensor:
    """The sparse map's ``idx`` (int32, length ``D``) on CPU, from the Rust core."""
    from ... import _core

    idx, _ = _core.projection(p.seed, p.total, p.d)
    return torch.from_numpy(idx).to(torch.int32)
