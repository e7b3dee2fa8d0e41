"""unilora_rs: Uni-LoRA adapters with a frozen, portable projection generator.

This module needs only numpy; the torch training layer lives in
:mod:`unilora_rs.torch` and is imported only on request.

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
from .errors import (
    DtypeError,
    FormatError,
    InvalidArgumentError,
    MismatchError,
    UniLoraError,
    VectorError,
)

__version__: str = _core.__version__
SPEC_VERSION: int = _core.SPEC_VERSION

__all__ = [
    "SPEC_VERSION",
    "DtypeError",
    "FormatError",
    "InvalidArgumentError",
    "MismatchError",
    "UniLoraError",
    "VectorError",
    "__version__",
    "fingerprint",
    "get_num_threads",
    "projection",
    "reconstruct",
    "reconstruct_backward",
    "set_num_threads",
    "total_size",
]

_U64_MAX = (1 << 64) - 1

Shape = tuple[int, int]
ShapeSpec = Sequence[Shape] | Mapping[str, Shape]


def _check_uint(name: str, value: object, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidArgumentError(f"{name} must be an integer, got {type(value).__name__}")
    v = int(value)
    if not minimum <= v <= _U64_MAX:
        raise InvalidArgumentError(f"{name} must be in [{minimum}, 2**64 - 1], got {v}")
    return v


def _check_shape(label: str, shape: object) -> Shape:
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) or len(shape) != 2:
        raise InvalidArgumentError(f"shape {label} must be a (rows, cols) pair, got {shape!r}")
    rows, cols = shape
    for dim in (rows, cols):
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
            raise InvalidArgumentError(f"shape {label} = {shape!r}: dimensions must be integers")
        if int(dim) <= 0:
            raise InvalidArgumentError(
                f"shape {label} = {tuple(shape)!r}: every dimension must be at least 1"
            )
    return int(rows), int(cols)


def _named_shapes(shapes: ShapeSpec) -> tuple[list[str] | None, list[Shape]]:
    """Splits ``shapes`` into (names or None, validated (rows, cols) list)."""
    if isinstance(shapes, Mapping):
        names = [str(k) for k in shapes]
        dims = [_check_shape(repr(k), v) for k, v in shapes.items()]
        result: tuple[list[str] | None, list[Shape]] = (names, dims)
    elif isinstance(shapes, Sequence) and not isinstance(shapes, (str, bytes)):
        result = (None, [_check_shape(f"#{k}", s) for k, s in enumerate(shapes)])
    else:
        raise InvalidArgumentError(
            "shapes must be a list of (rows, cols) pairs or a dict name -> (rows, cols), "
            f"got {type(shapes).__name__}"
        )
    if not result[1]:
        raise InvalidArgumentError("shapes is empty: give at least one (rows, cols) matrix shape")
    return result


def _as_vector(vector: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """float32, 1-D, C-contiguous view of ``vector`` (float64 is converted; copies if needed)."""
    arr = np.asarray(vector)
    if arr.dtype not in (np.float32, np.float64):
        raise DtypeError(
            f"vector has dtype {arr.dtype}; theta_d must be float32 (float64 is converted)"
        )
    if arr.ndim != 1:
        raise InvalidArgumentError(f"vector must be 1-D, got shape {arr.shape}")
    if arr.dtype == np.float64 and arr.size and not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise VectorError(
            f"vector[{bad}] = {arr[bad]} is not finite: theta_d must not hold NaN or Inf"
        )
    if arr.dtype == np.float64 and arr.size:
        too_big = np.abs(arr) > np.finfo(np.float32).max
        if too_big.any():
            bad = int(np.flatnonzero(too_big)[0])
            raise VectorError(
                f"vector[{bad}] = {arr[bad]} is not finite as float32: theta_d must not hold "
                "NaN or Inf"
            )
    return np.ascontiguousarray(arr, dtype=np.float32)


def total_size(shapes: ShapeSpec) -> int:
    """``D``: the number of elements of all matrices of ``shapes`` together."""
    return sum(r * c for r, c in _named_shapes(shapes)[1])


def projection(
    seed: int, total: int, d: int
) -> tuple[npt.NDArray[np.int32] | npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """The explicit projection map of ``total`` rows (``D``) onto ``d`` columns.

    Returns ``(idx, scale)``: row ``i`` of ``theta_D`` is ``theta_d[idx[i]] * scale[i]``.
    ``idx`` is int32 (int64 only when ``d >= 2**31``), ``scale`` is float32 and equals
    ``1 / sqrt(n_j)`` with ``n_j`` the number of rows using column ``j``.
    :func:`reconstruct` never builds these arrays; this is for inspection and tests.
    """
    seed = _check_uint("seed", seed)
    total = _check_uint("total", total, minimum=1)
    d = _check_uint("d", d, minimum=1)
    return _core.projection(seed, total, d)  # type: ignore[no-any-return]


@overload
def reconstruct(
    vector: npt.ArrayLike, seed: int, shapes: Mapping[str, Shape]
) -> dict[str, npt.NDArray[np.float32]]: ...
@overload
def reconstruct(
    vector: npt.ArrayLike, seed: int, shapes: Sequence[Shape]
) -> list[npt.NDArray[np.float32]]: ...
def reconstruct(
    vector: npt.ArrayLike, seed: int, shapes: ShapeSpec
) -> list[npt.NDArray[np.float32]] | dict[str, npt.NDArray[np.float32]]:
    """Rebuilds float32 matrices from the trainable vector ``theta_d``.

    ``theta_D = P theta_d`` is cut into consecutive row-major matrices of ``shapes`` (a
    list of ``(rows, cols)``, or a dict ``name -> (rows, cols)`` whose order is kept).
    ``d = len(vector)``. The work runs in Rust, in parallel, with the GIL released and
    no index array; the returned arrays are the Rust buffers themselves (no copy).

    Raises :class:`VectorError` for NaN/Inf, :class:`InvalidArgumentError` for bad
    shapes or ``d > D``, :class:`DtypeError` for non-float input.
    """
    seed = _check_uint("seed", seed)
    names, dims = _named_shapes(shapes)
    vec = _as_vector(vector)
    if vec.size == 0:
        raise InvalidArgumentError("vector is empty: d must be at least 1")
    arrays = _core.reconstruct(vec, seed, dims)
    if names is None:
        return list(arrays)
    return dict(zip(names, arrays, strict=True))


def reconstruct_backward(grad: npt.ArrayLike, seed: int, d: int) -> npt.NDArray[np.float32]:
    """The backward pass of :func:`reconstruct`: ``grad_theta_d = P^T grad_theta_D``.

    ``grad`` is the gradient of the flattened ``theta_D`` (all matrices concatenated in
    order, float32 or float64, length ``D``). Column ``j`` sums its rows' gradients in
    the fixed order of the inverse enumeration (docs/SPEC.md), in float32, then
    multiplies by its scale: deterministic, atomic-free and identical for every thread
    count. NaN/Inf in ``grad`` propagate (they are not an input error here).
    """
    seed = _check_uint("seed", seed)
    d = _check_uint("d", d, minimum=1)
    arr = np.asarray(grad)
    if arr.dtype not in (np.float32, np.float64):
        raise DtypeError(f"grad has dtype {arr.dtype}; expected float32 (float64 is converted)")
    if arr.ndim != 1:
        raise InvalidArgumentError(
            f"grad must be 1-D (the flattened theta_D), got shape {arr.shape}"
        )
    with np.errstate(over="ignore"):
        flat = np.ascontiguousarray(arr, dtype=np.float32)
    return _core.reconstruct_backward(flat, seed, d)


def fingerprint(seed: int, d: int, shapes: ShapeSpec) -> str:
    """The fingerprint that binds an adapter to its spec version, seed, ``d`` and shapes.

    A list of shapes is named ``"0"``, ``"1"``, ...; a dict uses its keys. See
    docs/SPEC.md for the exact text that is hashed (SHA-256).
    """
    seed = _check_uint("seed", seed)
    d = _check_uint("d", d, minimum=1)
    names, dims = _named_shapes(shapes)
    labels = names if names is not None else [str(k) for k in range(len(dims))]
    return _core.fingerprint(seed, d, [(n, r, c) for n, (r, c) in zip(labels, dims, strict=True)])


def set_num_threads(n: int) -> None:
    """Sets the worker threads of the Rust core; ``0`` restores the default
    (``UNILORA_NUM_THREADS`` or the CPU count) and ``1`` disables parallelism.
    Results never depend on the thread count."""
    _core.set_num_threads(_check_uint("n", n))


def get_num_threads() -> int:
    """The number of worker threads the Rust core will use."""
    return _core.get_num_threads()


# The adapter format needs the functions above; imported last on purpose.
from .adapter import AdapterConfig, ModuleSpec, load_adapter, load_adapter_config  # noqa: E402

__all__ += ["AdapterConfig", "ModuleSpec", "load_adapter", "load_adapter_config"]

# Merge, exact LoRA export and inspection (numpy only); imported last on purpose.
from .errors import InternalError, UniLoraWarning  # noqa: E402
from .merging import (  # noqa: E402
    AdapterInfo,
    ExportResult,
    MergedTensor,
    MergeResult,
    export_lora,
    inspect,
    merge,
)

__all__ += [
    "AdapterInfo",
    "ExportResult",
    "InternalError",
    "MergeResult",
    "MergedTensor",
    "UniLoraWarning",
    "export_lora",
    "inspect",
    "merge",
]
