"""The numpy API: projection, reconstruction, its backward pass and the fingerprint.

Arguments are converted and checked by the compiled core (:mod:`unilora_rs._core`);
every bad input raises a :class:`~unilora_rs.UniLoraError` subclass. This module adds
the documentation and the typing overloads.

>>> import numpy as np, unilora_rs as ur
>>> theta = np.full(8, 0.5, dtype=np.float32)
>>> mats = ur.reconstruct(theta, seed=0, shapes=[(4, 4), (2, 3)])
>>> [m.shape for m in mats]
[(4, 4), (2, 3)]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import overload

import numpy as np
import numpy.typing as npt

from . import _core

__all__ = [
    "MAX_THREADS",
    "fingerprint",
    "get_num_threads",
    "projection",
    "reconstruct",
    "reconstruct_backward",
    "set_num_threads",
    "total_size",
]

Shape = tuple[int, int]
ShapeSpec = Sequence[Shape] | Mapping[str, Shape]

#: The largest number of worker threads :func:`set_num_threads` accepts
#: (256, or the number of CPUs if larger).
MAX_THREADS: int = _core.MAX_THREADS


def total_size(shapes: ShapeSpec) -> int:
    """``D``: the number of elements of all matrices of ``shapes`` together."""
    return _core.total_size(shapes)


def projection(
    seed: int, total: int, d: int
) -> tuple[npt.NDArray[np.int32] | npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """The explicit projection map of ``total`` rows (``D``) onto ``d`` columns.

    Returns ``(idx, scale)``: row ``i`` of ``theta_D`` is ``theta_d[idx[i]] * scale[i]``.
    ``idx`` is int32 (int64 only when ``d >= 2**31``), ``scale`` is float32 and equals
    ``1 / sqrt(n_j)`` with ``n_j`` the number of rows using column ``j``.
    :func:`reconstruct` never builds these arrays; this is for inspection and tests.
    """
    return _core.projection(seed, total, d)


@overload
def reconstruct(
    vector: npt.ArrayLike,
    seed: int,
    shapes: Mapping[str, Shape],
    *,
    out: Mapping[str, npt.NDArray[np.float32]] | None = None,
    projection: str = "sparse",
) -> dict[str, npt.NDArray[np.float32]]: ...
@overload
def reconstruct(
    vector: npt.ArrayLike,
    seed: int,
    shapes: Sequence[Shape],
    *,
    out: Sequence[npt.NDArray[np.float32]] | None = None,
    projection: str = "sparse",
) -> list[npt.NDArray[np.float32]]: ...
def reconstruct(
    vector: npt.ArrayLike,
    seed: int,
    shapes: ShapeSpec,
    *,
    out: Sequence[npt.NDArray[np.float32]] | Mapping[str, npt.NDArray[np.float32]] | None = None,
    projection: str = "sparse",
) -> list[npt.NDArray[np.float32]] | dict[str, npt.NDArray[np.float32]]:
    """Rebuilds float32 matrices from the trainable vector ``theta_d``.

    ``theta_D = P theta_d`` is cut into consecutive row-major matrices of ``shapes`` (a
    list of ``(rows, cols)``, or a dict ``name -> (rows, cols)`` whose order is kept).
    ``d = len(vector)``; float64 input is converted to float32. The work runs in Rust,
    in parallel, with the GIL released and no index array; the returned arrays are the
    Rust buffers themselves (no copy).

    ``out``: arrays to write into instead of allocating new ones, in the structure of the
    result (a list, or a dict for named shapes) of writable C-contiguous float32 arrays
    of the right shapes; they are returned.

    ``projection``: ``"sparse"`` (the default: the balanced map of spec v1) or
    ``"fastfood"`` (the paper's dense Fastfood map, spec v2: Walsh-Hadamard blocks,
    O(D log n) time, no index memory either). See docs/SPEC.md.

    Raises :class:`VectorError` for NaN/Inf, :class:`InvalidArgumentError` for bad
    shapes, seeds, projections or ``d > D``, :class:`DtypeError` for non-float input.
    """
    return _core.reconstruct(vector, seed, shapes, out=out, projection=projection)


def reconstruct_backward(
    grad: npt.ArrayLike, seed: int, d: int, *, projection: str = "sparse"
) -> npt.NDArray[np.float32]:
    """The backward pass of :func:`reconstruct`: ``grad_theta_d = P^T grad_theta_D``.

    ``grad`` is the gradient of the flattened ``theta_D`` (all matrices concatenated in
    order, float32 or float64, length ``D``). Each column sums its rows' gradients in
    the fixed, chunked order of docs/SPEC.md (section 1.4), in float32, then multiplies
    by its scale: deterministic, atomic-free and identical for every thread count and
    on the GPU. NaN/Inf in ``grad`` propagate (they are not an input error here).
    ``projection="fastfood"`` gives the Fastfood map's exact adjoint (its blocks are
    added in increasing order; docs/SPEC.md section 4).
    """
    return _core.reconstruct_backward(grad, seed, d, projection=projection)


def fingerprint(seed: int, d: int, shapes: ShapeSpec) -> str:
    """The fingerprint that binds an adapter to its spec version, seed, ``d`` and shapes.

    A list of shapes is named ``"0"``, ``"1"``, ...; a dict uses its keys, which must be
    free of control characters (tabs, line breaks, ...) as module names in adapter
    configs are: :class:`InvalidArgumentError` names the first such key. See
    docs/SPEC.md for the exact text that is hashed (SHA-256).
    """
    return _core.fingerprint(seed, d, shapes)


def set_num_threads(n: int) -> None:
    """Sets the worker threads of the Rust core; ``0`` restores the default
    (``UNILORA_NUM_THREADS`` or the CPU count) and ``1`` disables parallelism.
    At most :data:`MAX_THREADS`; results never depend on the thread count."""
    _core.set_num_threads(n)


def get_num_threads() -> int:
    """The number of worker threads the Rust core will use."""
    return _core.get_num_threads()
