"""Merging an adapter into a safetensors checkpoint, exact LoRA export, inspection.

numpy-only wrappers over the Rust core (no torch). The heavy work runs in Rust with the
GIL released; these functions check arguments and shape the results.

>>> import unilora_rs as ur
>>> result = ur.merge("llama/", "my-adapter/", "llama-merged/")  # doctest: +SKIP
>>> result.merged_count  # doctest: +SKIP
224
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _core
from ._util import PathArg, as_path, dtype_name, with_progress
from .adapter import (
    MAP_INDICES_KEY,
    MAP_SCALES_KEY,
    VECTOR_KEY,
    WEIGHTS_NAME,
    AdapterConfig,
    ModuleSpec,
    adapter_directory,
)
from .errors import InvalidArgumentError, UniLoraWarning
from .reports import ExportResult, MergeEachResult, MergeResult, merge_result

__all__ = [
    "AdapterInfo",
    "export_lora",
    "inspect",
    "merge",
    "merge_each",
    "merge_weighted",
]


@dataclass(frozen=True)
class AdapterInfo:
    """A summary of an adapter directory (see :func:`inspect`)."""

    path: Path
    seed: int
    d: int
    rank: int
    alpha: float
    modules: list[ModuleSpec]
    lora_parameters: int
    modules_to_save: list[str]
    saved_tensors: dict[str, tuple[str, list[int]]]
    saved_parameters: int
    fingerprint: str
    expected_fingerprint: str
    theta_finite: bool
    theta_norm: float
    size_on_disk: int
    base_model_name_or_path: str | None
    spec_version: int
    format_version: int
    kinds: dict[str, int] = field(default_factory=dict)
    #: ``"sparse"``, ``"fastfood"``, ``"explicit"`` or ``"peft-numpy"``.
    projection: str = "sparse"
    #: The SHA-256 the config records for its map, and the one the map has.
    map_sha256: str | None = None
    actual_map_sha256: str | None = None

    @property
    def fingerprint_ok(self) -> bool:
        """Whether the stored fingerprint matches seed, ``d`` and the module list."""
        return self.fingerprint == self.expected_fingerprint

    @property
    def map_ok(self) -> bool:
        """Whether the map (explicit or regenerated) has the recorded SHA-256 (always
        true for the projections generated from the seed)."""
        return self.map_sha256 == self.actual_map_sha256

    @property
    def scaling(self) -> float:
        """The LoRA scaling ``alpha / r``."""
        return float(self.alpha) / self.rank

    @property
    def compression(self) -> float:
        """``D / d``: LoRA parameters per trainable parameter."""
        return self.lora_parameters / self.d

    @property
    def lora_bytes(self) -> int:
        """Tensor bytes of the equivalent float32 LoRA adapter (factors + saved modules)."""
        return 4 * self.lora_parameters + sum(
            _DTYPE_SIZES.get(dt, 0) * _numel(shape) for dt, shape in self.saved_tensors.values()
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            "path": str(self.path),
            "seed": self.seed,
            "d": self.d,
            "rank": self.rank,
            "alpha": self.alpha,
            "scaling": self.scaling,
            "modules": len(self.modules),
            "kinds": self.kinds,
            "lora_parameters": self.lora_parameters,
            "compression": self.compression,
            "modules_to_save": self.modules_to_save,
            "saved_parameters": self.saved_parameters,
            "trainable_parameters": self.d + self.saved_parameters,
            "fingerprint": self.fingerprint,
            "fingerprint_ok": self.fingerprint_ok,
            "theta_finite": self.theta_finite,
            "theta_norm": self.theta_norm,
            "size_on_disk": self.size_on_disk,
            "lora_bytes": self.lora_bytes,
            "base_model_name_or_path": self.base_model_name_or_path,
            "spec_version": self.spec_version,
            "format_version": self.format_version,
            "projection": self.projection,
            "map_sha256": self.map_sha256,
            "map_ok": self.map_ok,
            "module_list": [
                {
                    "name": m.name,
                    "in_features": m.in_features,
                    "out_features": m.out_features,
                    "kind": m.kind,
                }
                for m in self.modules
            ],
        }


_DTYPE_SIZES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "I8": 1}


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


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
    inside, or containing an input raises :class:`InvalidArgumentError`. The inputs are
    never modified. Ctrl-C, or any signal handler that raises (the ``unilora`` command
    turns SIGTERM into one), cancels cleanly: no partial output. Temporaries left by
    processes that were killed outright are removed by the next run (once untouched
    for a minute).
    """
    base_p, adapter_p, out_p = (
        as_path("base", base),
        as_path("adapter", adapter),
        as_path("out", out),
    )
    dt = dtype_name(dtype, allow_none=True)
    raw, seconds = with_progress(
        show_progress,
        lambda cb: _core.merge(
            base_p, adapter_p, out_p, dtype=dt, overwrite=bool(overwrite), progress=cb
        ),
        desc="merge",
    )
    _warn(raw["warnings"])
    return merge_result(raw, seconds)


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
    dt = dtype_name(dtype, allow_none=True)
    (raws, bytes_read), seconds = with_progress(
        show_progress,
        lambda cb: _core.merge_each(
            base_p, paths, out_p, dtype=dt, overwrite=bool(overwrite), progress=cb
        ),
        desc="merge",
    )
    _warn(raws[0]["warnings"] if raws else [])
    return MergeEachResult([merge_result(raw, seconds) for raw in raws], bytes_read, seconds)


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
    :class:`InvalidArgumentError` (a weighted merge does not average heads).
    """
    base_p, out_p = as_path("base", base), as_path("out", out)
    paths = _adapter_list(adapters)
    ws = [float(w) for w in weights]
    dt = dtype_name(dtype, allow_none=True)
    raw, seconds = with_progress(
        show_progress,
        lambda cb: _core.merge_weighted(
            base_p, paths, ws, out_p, dtype=dt, overwrite=bool(overwrite), progress=cb
        ),
        desc="merge",
    )
    _warn(raw["warnings"])
    return merge_result(raw, seconds)


SAVED_MODULES_CHOICES = ("error", "keep", "drop", "separate")


def export_lora(
    adapter: PathArg,
    out: PathArg,
    *,
    dtype: str = "f32",
    overwrite: bool = False,
    saved_modules: str = "error",
) -> ExportResult:
    """Writes the exact PEFT LoRA equivalent of a Uni-LoRA adapter into folder ``out``.

    ``adapter_model.safetensors`` holds ``base_model.model.<module>.lora_A.weight``
    (``r x in``) and ``...lora_B.weight`` (``out x r``) for every module, plus the
    ``modules_to_save`` tensors as ``base_model.model.<name>``; ``adapter_config.json``
    has ``peft_type = "LORA"``, the same ``r``, ``lora_alpha = alpha`` and
    ``target_modules`` listing exactly the adapted modules (``fan_in_fan_out`` is true
    when every module is a GPT-2 style ``conv1d``). PEFT's ``PeftModel.from_pretrained``,
    vLLM and llama.cpp's LoRA converter read this layout. ``dtype="f32"`` (default) is
    exact; ``"bf16"`` or ``"f16"`` round the factors to nearest even.

    ``saved_modules`` says what to do with the adapter's ``modules_to_save`` tensors
    (a trained head, say): ``"error"`` (default) refuses such an adapter, since vLLM's
    LoRA loader and llama.cpp's ``convert_lora_to_gguf.py`` reject saved modules;
    ``"keep"`` writes them into the adapter as ``base_model.model.<name>`` (PEFT loads
    them); ``"drop"`` leaves them out (the LoRA model then lacks the trained modules);
    ``"separate"`` writes them under their own names (the base model's keys) to
    ``saved_modules.safetensors`` in ``out``, where no LoRA loader looks
    (:attr:`ExportResult.saved_file`). Only ``"keep"`` lists them in the config.
    """
    adapter_p, out_p = as_path("adapter", adapter), as_path("out", out)
    dt = dtype_name(dtype, allow_none=False)
    t0 = time.perf_counter()
    raw = _core.export_lora(
        adapter_p, out_p, dtype=dt, overwrite=bool(overwrite), saved_modules=saved_modules
    )
    return ExportResult._from_core(raw, time.perf_counter() - t0)


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def inspect(adapter: PathArg) -> AdapterInfo:
    """Summarises an adapter: ``d``, seed, rank, projection, modules, parameter counts,
    the fingerprint check (reported, not raised: see :attr:`AdapterInfo.fingerprint_ok`),
    the map check of explicit and regenerated maps (:attr:`AdapterInfo.map_ok`), whether
    ``theta_d`` is finite (reported too), and the size on disk against the equivalent
    float32 LoRA.

    Every other check is the one the Rust merge makes: a malformed config or weights
    file raises :class:`FormatError` (or :class:`MismatchError`, :class:`VectorError`),
    missing files ``FileNotFoundError``.
    """
    import numpy as np

    path = as_path("adapter", adapter)
    checked, theta, arrays = _core.load_adapter(path, verify=False)
    config = AdapterConfig._from_checked(checked)
    directory = adapter_directory(path)
    _meta, tensors, _start = _core.safetensors_header(directory / WEIGHTS_NAME)
    finite = bool(np.isfinite(theta).all())
    saved = {
        name: (dt, list(sh))
        for name, (dt, sh, _) in tensors.items()
        if name not in (VECTOR_KEY, MAP_INDICES_KEY, MAP_SCALES_KEY)
    }
    kinds: dict[str, int] = {}
    for m in config.modules:
        kinds[m.kind] = kinds.get(m.kind, 0) + 1
    return AdapterInfo(
        path=directory,
        seed=config.seed,
        d=config.vector_length,
        rank=config.rank,
        alpha=config.alpha,
        modules=list(config.modules),
        lora_parameters=int(checked["total_size"]),
        modules_to_save=list(config.modules_to_save),
        saved_tensors=saved,
        saved_parameters=sum(_numel(sh) for _, sh in saved.values()),
        fingerprint=config.fingerprint,
        expected_fingerprint=str(checked["expected_fingerprint"]),
        theta_finite=finite,
        theta_norm=float(np.linalg.norm(theta.astype(np.float64))) if finite else float("nan"),
        size_on_disk=_dir_size(directory),
        base_model_name_or_path=config.base_model_name_or_path,
        spec_version=int(checked["spec_version"]),
        format_version=config.format_version,
        kinds=kinds,
        projection=config.projection,
        map_sha256=config.map_sha256,
        actual_map_sha256=None if arrays is None else arrays[2],
    )
