"""Merging adapters into a safetensors checkpoint: one, each alone, or a weighted sum.

numpy-only wrappers over the Rust core (no torch). The heavy work runs in Rust with the
GIL released; these functions check arguments and shape the results.

>>> import unilora_rs as ur
>>> result = ur.merge("llama/", "my-adapter/", "llama-merged/")  # doctest: +SKIP
>>> result.merged_count  # doctest: +SKIP
224
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from . import _core
from ._util import PathArg, as_path, dtype_name, with_progress
from .errors import InvalidArgumentError, UniLoraWarning
from .reports import MergeEachResult, MergeResult

__all__ = [
    "merge",
    "merge_each",
    "merge_weighted",
]

T = TypeVar("T")


def _run(
    call: Callable[..., T],
    args: tuple[object, ...],
    dtype: object,
    show_progress: bool,
    overwrite: bool,
) -> T:
    """``call(*args)`` of the core with the merge options, under a progress bar when
    asked: its report (which records the seconds the merge took)."""
    dt = dtype_name(dtype, allow_none=True)
    report, _seconds = with_progress(
        show_progress,
        lambda cb: call(*args, dtype=dt, overwrite=bool(overwrite), progress=cb),
        desc="merge",
    )
    return report


def _warn(messages: list[str]) -> None:
    for message in messages:
        warnings.warn(message, UniLoraWarning, stacklevel=3)


def merge(
    base: PathArg,
    adapter: PathArg,
    out: PathArg,
    *,
    dtype: str | None = None,
    show_progress: bool = False,
    overwrite: bool = False,
) -> MergeResult:
    """Merges a Uni-LoRA adapter into a safetensors checkpoint, streaming, in Rust.

    ``base`` is a ``.safetensors`` file (then ``out`` is the output file) or a model
    folder (then ``out`` is the output folder: shards keep their names, the index and
    every other file, such as ``config.json`` and the tokenizer, are copied). A folder
    means what transformers loads from it: the file ``config.json`` names in
    ``transformers_weights``, else ``model.safetensors``, else
    ``model.safetensors.index.json`` and its shards (else its ``.safetensors`` files).
    Other weights files in the folder (a stale ``model.safetensors`` next to shards,
    say) are left out of the output, with a :class:`UniLoraWarning`, so that no loader
    can pick unmerged weights from it.

    Each adapted module's weight ``W`` becomes ``W + (alpha / r) * B @ A`` (transposed
    for ``conv1d`` modules), computed in float32 and rounded once, to nearest even.
    ``modules_to_save`` tensors of the adapter replace the same-named base tensors;
    those the base lacks and the adapter's ``task`` lists in ``new_tensors`` (a trained
    classification head on a base checkpoint) are added to the last output file (and
    to the shard index). Every other tensor and the header metadata are copied unchanged.
    ``config.json`` gets the adapter's ``task.config`` keys (``architectures``,
    ``id2label``, ...), so that ``AutoModelFor...from_pretrained(out)`` builds the
    trained model.

    ``dtype=None`` keeps each tensor's dtype; ``"bf16"``, ``"f16"`` or ``"f32"`` casts
    every floating tensor (F16, BF16, F32, F64) of the output to that dtype (integer and
    8-bit tensors are kept), and ``config.json``'s ``dtype`` (and ``torch_dtype`` when
    present) say so.

    A base saved from a bitsandbytes model (8-bit ``weight`` + ``SCB``, or 4-bit NF4 /
    FP4 with its quant state, nested absmax included) is dequantised: every quantized
    weight is rebuilt in float32 as bitsandbytes does, merged if adapted, and written in
    ``dtype`` (float32 when ``None``); the state tensors are left out and
    ``config.json`` loses ``quantization_config``.

    Every adapted module must match exactly one base tensor (``<name>.weight``, else a
    unique dotted-suffix match): a missing or ambiguous target raises
    :class:`MismatchError`. The output is written to temporary files and renamed into
    place when complete; an existing output raises :class:`FileExistsError` unless
    ``overwrite`` (and an existing folder is replaced only when it is empty or an
    earlier merge output, which holds a ``.unilora-output`` file); an output equal to,
    inside, or containing an input raises :class:`InvalidArgumentError`, as does a
    tensor that the merge (or ``dtype``, float16's range) turns Inf or NaN where the
    base is finite, by name. The inputs are never modified. Ctrl-C, or any signal
    handler that raises (``unilora`` turns SIGTERM into one), cancels cleanly: no
    partial output. Temporaries left by processes killed outright (SIGKILL) are
    removed by the next run into the same output once the process has ended (those of
    another machine or container sharing the folder once untouched for a minute).
    """
    paths = as_path("base", base), as_path("adapter", adapter), as_path("out", out)
    result: MergeResult = _run(_core.merge, paths, dtype, show_progress, overwrite)
    _warn(result.warnings)
    return result


def _adapter_list(adapters: object) -> list[Path]:
    if isinstance(adapters, (str, os.PathLike)) or not hasattr(adapters, "__iter__"):
        raise InvalidArgumentError("adapters must be a list of adapter folders")
    paths = [as_path("adapter", a) for a in adapters]  # type: ignore[attr-defined]
    if not paths:
        raise InvalidArgumentError("adapters is empty: give at least one adapter folder")
    return paths


def merge_each(
    base: PathArg,
    adapters: list[PathArg],
    out_dir: PathArg,
    *,
    dtype: str | None = None,
    show_progress: bool = False,
    overwrite: bool = False,
) -> MergeEachResult:
    """Merges each adapter alone into ``base`` in ONE pass over the base: writes
    ``out_dir/<adapter folder name>`` (a folder for a folder base, ``<name>.safetensors``
    for a file base) for every adapter, each byte for byte what :func:`merge` of that
    adapter writes, while every base shard is read once (N separate merges read it N
    times). Adapter folder names must differ. Checks, options and errors are those of
    :func:`merge`, for every output, before anything is written.
    """
    base_p, out_p = as_path("base", base), as_path("out_dir", out_dir)
    paths = _adapter_list(adapters)
    each: MergeEachResult = _run(
        _core.merge_each, (base_p, paths, out_p), dtype, show_progress, overwrite
    )
    _warn(each.results[0].warnings if each.results else [])
    return each


#: The largest finite float32, the type the weighted sum is computed in.
FLOAT32_MAX = 3.4028234663852886e38


def _weights(weights: object) -> list[float]:
    """The weights as floats, each finite in float32 (the merge computes in float32: a
    larger double would turn every adapted tensor into Inf or NaN)."""
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__iter__"):
        raise InvalidArgumentError("weights must be a list of numbers, one per adapter")
    out = []
    for i, w in enumerate(weights):  # type: ignore[attr-defined]
        try:
            f = float(w)
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"weight {i + 1} is not a number: {w!r}") from None
        if not abs(f) <= FLOAT32_MAX:
            raise InvalidArgumentError(
                f"weight {i + 1} is {w!r}, which is not a finite float32 number (the merge "
                f"computes in float32: |w| <= {FLOAT32_MAX:.7g})"
            )
        out.append(f)
    return out


def merge_weighted(
    base: PathArg,
    adapters: list[PathArg],
    weights: list[float],
    out: PathArg,
    *,
    dtype: str | None = None,
    show_progress: bool = False,
    overwrite: bool = False,
) -> MergeResult:
    """Merges several adapters into one checkpoint: every adapted weight becomes
    ``W + sum_i w_i * (alpha_i / r_i) * B_i @ A_i`` (a linear merge of the updates,
    streaming, torch-free), in float32 with a fixed operation order (docs/SPEC.md),
    rounded once. Adapters may adapt different modules. Their ``modules_to_save``
    tensors (heads) and task records must not collide: a tensor replaced or added by
    two adapters, or a ``config.json`` key they set differently, raises
    :class:`InvalidArgumentError` (a weighted merge does not average heads). A weight
    that is not a finite float32 number raises :class:`InvalidArgumentError`, and so
    does a merged tensor that the weighted sum (or the output dtype) turns Inf or NaN
    where the base is finite: the error names it and nothing is written.
    """
    base_p, out_p = as_path("base", base), as_path("out", out)
    paths = _adapter_list(adapters)
    ws = _weights(weights)
    result: MergeResult = _run(
        _core.merge_weighted, (base_p, paths, ws, out_p), dtype, show_progress, overwrite
    )
    _warn(result.warnings)
    return result
