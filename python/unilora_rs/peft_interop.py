"""PEFT's Uni-LoRA adapters in (PEFT 0.21, ``peft_type = "UNILORA"``): PEFT's map,
regenerated with numpy, and the conversion of a PEFT adapter into ours. The way out,
our adapter in PEFT's format, is :func:`unilora_rs.export.peft.export_peft`.

PEFT's tuner flattens the adapted layers in ``model.modules()`` order, ``A`` (``r x
in``) before ``B`` (``out x r``) within each, and maps every position to a column of
``theta_d`` with numpy: ``rng = default_rng(proj_seed)``, ``repeat(arange(d), D // d)``
plus ``rng.choice(d, D % d, replace=False)``, then ``rng.shuffle``. A column used ``n``
times has the scale ``float32(1) / sqrt(float32(n))`` (torch's ``rsqrt``). It saves
``base_model.unilora_theta_d`` and, with ``save_indices=True``, every layer's indices
and scales.

Our spec v1 generator cannot express that map, so a converted adapter carries it:

* ``projection="explicit"``: the indices (int32) and scales (float32) in the adapter
  file, in our flattening order (``B`` then ``A`` per module);
* ``projection="peft-numpy"``: nothing stored; :func:`regenerate_map` rebuilds it with
  numpy on every load (the Rust core calls it).

Either way the SHA-256 of the map is recorded at conversion (``map_sha256``, part of
the fingerprint) and checked on every load, so a numpy whose stream changed is detected
instead of giving another model.

:func:`convert_peft` needs torch, transformers and peft (to find PEFT's module order
from the base model's config); :func:`regenerate_map` and :func:`peft_map` need numpy
only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _core
from ._util import PathArg
from .adapter import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterConfig,
    ModuleSpec,
    ProjectionMap,
    save_adapter,
)
from .errors import FormatError, InvalidArgumentError, MismatchError
from .extras import FEATURES, require

__all__ = [
    "ConvertResult",
    "convert_peft",
    "peft_index",
    "peft_map",
    "regenerate_map",
]

#: Where PEFT keeps ``theta_d`` and the layers in a saved Uni-LoRA adapter.
PEFT_VECTOR_KEY = "base_model.unilora_theta_d"
PEFT_PREFIX = "base_model.model."
#: The output kind of :func:`convert_peft` (its folder's marker).
CONVERT_KIND = "convert-peft"

#: PEFT's task types and the transformers class each wraps.
_TASK_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


# ---------------------------------------------------------------------------------------
# PEFT's map, with numpy
# ---------------------------------------------------------------------------------------


def peft_index(total: int, d: int, seed: int) -> npt.NDArray[np.int64]:
    """PEFT's ``UniLoraModel.generate_index(total, d, seed)``, written with numpy alone:
    the column of every position of PEFT's flattened LoRA parameters (int64)."""
    base_count, remaining = divmod(total, d)
    rng = np.random.default_rng(seed)
    data = np.repeat(np.arange(d), base_count)
    if remaining > 0:
        extras = rng.choice(d, size=remaining, replace=False)
        data = np.concatenate([data, extras])
    rng.shuffle(data)
    return data.astype(np.int64, copy=False)


def peft_scales(indices: npt.NDArray[np.integer], d: int) -> npt.NDArray[np.float32]:
    """The scale of every column as PEFT computes it: ``rsqrt`` of its count in float32
    (``float32(1) / sqrt(float32(n))``), 0 for an unused column."""
    counts = np.bincount(indices, minlength=d)
    scales = np.zeros(d, dtype=np.float32)
    used = counts > 0
    scales[used] = np.float32(1) / np.sqrt(counts[used].astype(np.float32))
    return scales


def _reorder(
    peft_order: npt.NDArray[np.integer], rank: int, modules: Sequence[tuple[int, int]]
) -> npt.NDArray[np.int32]:
    """PEFT's per-module ``A`` then ``B`` blocks as ours: ``B`` then ``A``."""
    parts, offset = [], 0
    for fan_in, fan_out in modules:
        a = peft_order[offset : offset + rank * fan_in]
        offset += rank * fan_in
        b = peft_order[offset : offset + fan_out * rank]
        offset += fan_out * rank
        parts += [b, a]
    return np.concatenate(parts).astype(np.int32)


def peft_map(
    seed: int, d: int, rank: int, modules: Sequence[tuple[int, int]]
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """PEFT's map for modules ``(in_features, out_features)`` in PEFT's order, as
    ``(indices, scales)`` in our flattening order (per module ``B`` then ``A``)."""
    total = rank * sum(i + o for i, o in modules)
    index = peft_index(total, d, seed)
    ours = _reorder(index, rank, modules)
    return ours, peft_scales(index, d)[ours]


def regenerate_map(
    config: Mapping[str, Any],
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """The map of a ``projection="peft-numpy"`` adapter config (a checked dict), as
    ``(indices, scales)``; the Rust core calls this on every load and checks the
    result against the config's ``map_sha256``."""
    modules = [(int(m["in_features"]), int(m["out_features"])) for m in config["modules"]]
    return peft_map(int(config["seed"]), int(config["vector_length"]), int(config["rank"]), modules)


# ---------------------------------------------------------------------------------------
# PEFT adapter -> unilora_rs adapter
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvertResult:
    """What :func:`convert_peft` wrote."""

    out: Path
    modules: int
    projection: str
    map_sha256: str
    save_indices: bool
    saved_tensors: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as err:
        raise FormatError(f"{path}: not a readable JSON file ({err})") from err
    if not isinstance(value, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return value


def _peft_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not folder.is_dir():
        raise FileNotFoundError(2, "PEFT adapter folder not found", str(folder))
    cfg = _read_json(path)
    if cfg.get("peft_type") != "UNILORA":
        raise FormatError(
            f"{path}: not a PEFT Uni-LoRA adapter (peft_type = {cfg.get('peft_type')!r}, "
            "expected 'UNILORA')"
        )
    for key, low in (("r", 1), ("theta_d_length", 1), ("proj_seed", 0)):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value < 2**64:
            raise FormatError(
                f"{path}: {key} must be an integer in [{low}, 2^64 - 1], got {value!r}"
            )
    if cfg.get("bias", "none") != "none":
        raise FormatError(
            f"{path}: bias = {cfg['bias']!r} trains bias vectors, which a unilora_rs adapter "
            "does not hold (only bias = 'none' converts)"
        )
    return cfg


def _peft_tensors(folder: Path) -> dict[str, Any]:
    path = folder / WEIGHTS_NAME
    if not path.exists():
        other = (
            " (it holds adapter_model.bin: save with safe_serialization=True)"
            * (folder / "adapter_model.bin").exists()
        )
        raise FileNotFoundError(2, f"PEFT adapter weights not found{other}", str(path))
    _core.safetensors_header(path)  # a strict check first: size bombs, bad offsets
    from safetensors.torch import load_file

    return load_file(str(path))


def _base_folder(cfg: dict[str, Any], base: PathArg | None, source: Path) -> Path:
    if base is not None:
        folder = Path(base)
    else:
        recorded = cfg.get("base_model_name_or_path")
        folder = Path(recorded) if isinstance(recorded, str) and recorded else Path()
        if not recorded or not (folder / "config.json").is_file():
            raise InvalidArgumentError(
                f"{source}: the module order comes from the base model's config.json, and the "
                f"adapter names {recorded!r}, which is not a local model folder: pass --base DIR"
            )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(2, "base model config.json not found", str(folder / "config.json"))
    return folder


def _model_class(cfg: dict[str, Any], hf_config: Any) -> Any:
    """The transformers class PEFT wrapped: its recorded class, else its task's Auto
    class, else the config's first architecture, else ``AutoModel``."""
    import importlib

    import transformers

    mapping = cfg.get("auto_mapping") or {}
    if mapping.get("base_model_class") and mapping.get("parent_library"):
        module = importlib.import_module(mapping["parent_library"])
        return getattr(module, mapping["base_model_class"])
    if cfg.get("task_type") in _TASK_CLASSES:
        return getattr(transformers, _TASK_CLASSES[cfg["task_type"]])
    archs = getattr(hf_config, "architectures", None) or []
    if archs and hasattr(transformers, archs[0]):
        return getattr(transformers, archs[0])
    return transformers.AutoModel


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Keeps the ``logging`` logger ``name`` to errors while active."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def peft_modules(cfg: dict[str, Any], base: Path) -> tuple[list[ModuleSpec], list[str]]:
    """The layers PEFT's tuner adapts in the base model (built on the meta device from
    its ``config.json``), in PEFT's order, and the qualified names of its
    ``modules_to_save``."""
    require("convert_peft", FEATURES["unilora convert-peft"])
    with _quiet_logger("bitsandbytes"):  # peft imports it; it logs a missing kernel
        import peft
        from peft.tuners.unilora import UniLoraLayer
    import torch
    import transformers

    hf_config = transformers.AutoConfig.from_pretrained(base)
    cls = _model_class(cfg, hf_config)
    known = set(peft.UniLoraConfig.__dataclass_fields__)
    peft_cfg = peft.UniLoraConfig(**{k: v for k, v in cfg.items() if k in known})
    wanted = getattr(cls, "config_class", None)
    if isinstance(wanted, type) and not isinstance(hf_config, wanted):
        raise MismatchError(
            f"the PEFT adapter was trained on a {cls.__name__}, and {base / 'config.json'} "
            f"describes a {type(hf_config).__name__}: is this the adapter's base model?"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                auto = cls.__name__.startswith("Auto")
                model = cls.from_config(hf_config) if auto else cls(hf_config)
        except Exception as err:  # transformers raises many types for a foreign config
            raise MismatchError(
                f"{base / 'config.json'} does not build the adapter's {cls.__name__} "
                f"({type(err).__name__}: {err}): is this the adapter's base model?"
            ) from err
        wrapped = peft.get_peft_model(model, peft_cfg)
    inner = wrapped.base_model.model
    conv1d = getattr(transformers.pytorch_utils, "Conv1D", ())
    specs = []
    saved: list[str] = []
    for name, module in inner.named_modules():
        if isinstance(module, UniLoraLayer):
            kind = "conv1d" if isinstance(module.get_base_layer(), conv1d) else "linear"
            specs.append(ModuleSpec(name, int(module.in_features), int(module.out_features), kind))
        elif type(module).__name__ == "ModulesToSaveWrapper":
            saved.append(name)
    if not specs:
        raise MismatchError(
            f"target_modules = {cfg.get('target_modules')!r} selects no layer of {cls.__name__} "
            f"built from {base / 'config.json'}: is this the adapter's base model?"
        )
    return specs, saved


def _map_key(spec: ModuleSpec, what: str, which: str) -> str:
    return f"{PEFT_PREFIX}{spec.name}.unilora_{what}_{which}"


def _saved_map(
    tensors: dict[str, Any], specs: Sequence[ModuleSpec], rank: int, d: int, source: Path
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """The indices and scales PEFT saved (``save_indices=True``), in our order."""

    def tensor(key: str, shape: tuple[int, int], name: str) -> Any:
        if key not in tensors:
            raise FormatError(
                f"{source}: no {key!r}: the adapter saves indices for some layers but not for "
                f"{name!r}, which PEFT adapts in this base model"
            )
        if tuple(tensors[key].shape) != shape:
            raise MismatchError(
                f"{source}: {key} has shape {tuple(tensors[key].shape)}, the base model's "
                f"{name!r} needs {shape}"
            )
        return tensors[key].reshape(-1)

    idx_parts, scale_parts = [], []
    for spec in specs:
        for which, shape in (("B", (spec.out_features, rank)), ("A", (rank, spec.in_features))):
            index = tensor(_map_key(spec, "indices", which), shape, spec.name).numpy()
            if index.size and (index.min() < 0 or index.max() >= d):
                raise FormatError(f"{source}: {spec.name} indices_{which} leave [0, {d})")
            idx_parts.append(index.astype(np.int32))
            key = _map_key(spec, "scales", which)
            scales = tensor(key, shape, spec.name).float().numpy()
            if not np.isfinite(scales).all():
                raise FormatError(f"{source}: {key} holds NaN or Inf")
            scale_parts.append(scales)
    known = {_map_key(s, w, x) for s in specs for w in ("indices", "scales") for x in "AB"}
    stray = sorted(
        k for k in tensors if ".unilora_" in k and k != PEFT_VECTOR_KEY and k not in known
    )
    if stray:
        raise MismatchError(
            f"{source}: {stray[0]} belongs to no layer that PEFT adapts in this base model"
        )
    return np.concatenate(idx_parts), np.concatenate(scale_parts)


def _check_regenerated(
    indices: npt.NDArray[np.int32],
    scales: npt.NDArray[np.float32],
    cfg: dict[str, Any],
    specs: Sequence[ModuleSpec],
) -> None:
    """The numpy map equals the one PEFT's own ``generate_index`` gives (checked once,
    at conversion; the recorded SHA-256 guards every later load)."""
    import torch
    from peft.tuners.unilora import UniLoraModel

    rank, d = int(cfg["r"]), int(cfg["theta_d_length"])
    total = rank * sum(s.in_features + s.out_features for s in specs)
    theirs = UniLoraModel.generate_index(total, d, int(cfg["proj_seed"]))
    counts = torch.bincount(theirs, minlength=d)
    inv = torch.zeros(d, dtype=torch.float32)
    inv[counts > 0] = counts[counts > 0].float().rsqrt()
    modules = [(s.in_features, s.out_features) for s in specs]
    ours_from_theirs = _reorder(theirs.numpy(), rank, modules)
    if not (
        np.array_equal(ours_from_theirs, indices)
        and np.array_equal(inv.numpy()[ours_from_theirs].view(np.uint32), scales.view(np.uint32))
    ):
        raise MismatchError(
            "the numpy regeneration of PEFT's map differs from PEFT's own generate_index on "
            "this installation; convert with --explicit after upgrading unilora_rs"
        )


def convert_peft(
    peft_adapter: PathArg,
    out: PathArg,
    *,
    base: PathArg | None = None,
    explicit: bool = False,
    overwrite: bool = False,
) -> ConvertResult:
    """Converts a PEFT Uni-LoRA adapter folder into a unilora_rs adapter in ``out``.

    The layers and their order are PEFT's for the base model: its ``config.json`` (the
    adapter's ``base_model_name_or_path`` when that is a local folder, else ``base``)
    builds the model on the meta device and PEFT's tuner selects the layers, so
    ``target_modules``, ``layers_to_transform`` and the rest mean what they mean in PEFT.
    With saved indices (``save_indices=True``) the map is PEFT's file's, written as
    ``projection="explicit"``; without, it is regenerated with numpy (checked against
    PEFT's own ``generate_index``) and recorded as ``projection="peft-numpy"``, or, with
    ``explicit=True``, stored. ``alpha = r`` (PEFT's Uni-LoRA has no alpha);
    ``modules_to_save`` tensors are kept (as float32 when PEFT saved bfloat16).

    Needs torch, transformers and peft. The output folder appears atomically; an
    existing one is replaced only with ``overwrite`` and only if it is empty or an
    earlier ``convert-peft`` output.
    """
    t0 = time.perf_counter()
    source, out_p = Path(peft_adapter), Path(out)
    if out_p.resolve() == source.resolve() or source.resolve() in out_p.resolve().parents:
        raise InvalidArgumentError(f"output {out_p} is the PEFT adapter or inside it")
    cfg = _peft_config(source)
    tensors = _peft_tensors(source)
    theta = _peft_theta(cfg, tensors, source / WEIGHTS_NAME)
    specs, saved_modules = peft_modules(cfg, _base_folder(cfg, base, source))
    _check_lengths(cfg, specs)
    save_indices = any(".unilora_indices_" in k for k in tensors)
    projection_map = _projection_map(
        cfg, tensors, specs, save_indices, explicit, source / WEIGHTS_NAME
    )
    extra = _saved_tensors(tensors, saved_modules, source / WEIGHTS_NAME)
    config = _adapter_config(cfg, specs, saved_modules, extra, projection_map)
    _write_adapter(out_p, config, theta, extra, projection_map, overwrite)
    return ConvertResult(
        out=out_p,
        modules=len(specs),
        projection=projection_map.kind,
        map_sha256=projection_map.sha256,
        save_indices=save_indices,
        saved_tensors=sorted(extra),
        seconds=time.perf_counter() - t0,
    )


def _peft_theta(
    cfg: dict[str, Any], tensors: dict[str, Any], weights: Path
) -> npt.NDArray[np.float32]:
    """PEFT's ``theta_d`` as float32, checked against ``theta_d_length``."""
    if PEFT_VECTOR_KEY not in tensors:
        raise FormatError(f"{weights}: no {PEFT_VECTOR_KEY!r} tensor")
    theta: npt.NDArray[np.float32] = tensors[PEFT_VECTOR_KEY].float().numpy().reshape(-1)
    d = int(cfg["theta_d_length"])
    if theta.shape != (d,):
        raise FormatError(
            f"{weights}: {PEFT_VECTOR_KEY} has {theta.size} values, theta_d_length is {d}"
        )
    return theta


def _check_lengths(cfg: dict[str, Any], specs: Sequence[ModuleSpec]) -> None:
    """``d <= D``, as every unilora_rs adapter needs."""
    rank, d = int(cfg["r"]), int(cfg["theta_d_length"])
    total = rank * sum(s.in_features + s.out_features for s in specs)
    if d > total:
        raise InvalidArgumentError(
            f"theta_d_length d = {d} is larger than D = {total}, the LoRA parameters of the "
            f"{len(specs)} adapted layers: a unilora_rs adapter needs d <= D"
        )


def _projection_map(
    cfg: dict[str, Any],
    tensors: dict[str, Any],
    specs: Sequence[ModuleSpec],
    save_indices: bool,
    explicit: bool,
    weights: Path,
) -> ProjectionMap:
    """PEFT's map in our order: the saved one (``"explicit"``), else regenerated with
    numpy and checked against PEFT's (``"peft-numpy"``, or ``"explicit"`` when asked)."""
    rank, d, seed = int(cfg["r"]), int(cfg["theta_d_length"]), int(cfg["proj_seed"])
    if save_indices:
        indices, scales = _saved_map(tensors, specs, rank, d, weights)
        kind = "explicit"
    else:
        indices, scales = peft_map(seed, d, rank, [(s.in_features, s.out_features) for s in specs])
        _check_regenerated(indices, scales, cfg, specs)
        kind = "explicit" if explicit else "peft-numpy"
    return ProjectionMap.of(kind, indices, scales)


def _saved_tensors(
    tensors: dict[str, Any], saved_modules: Sequence[str], weights: Path
) -> dict[str, npt.NDArray[Any]]:
    """The ``modules_to_save`` tensors under the base model's names; any other tensor
    that is not ``theta_d``, an index or a scale raises."""
    extra = {}
    for key, t in tensors.items():
        if key == PEFT_VECTOR_KEY or ".unilora_" in key:
            continue
        name = key.removeprefix(PEFT_PREFIX)
        if not key.startswith(PEFT_PREFIX) or not any(
            name.startswith(m + ".") for m in saved_modules
        ):
            raise FormatError(
                f"{weights}: tensor {key!r} is neither theta_d, an index or scale, "
                f"nor part of modules_to_save {saved_modules}"
            )
        # numpy has no bfloat16: such tensors are kept as float32 (exact).
        extra[name] = (t.float() if str(t.dtype) == "torch.bfloat16" else t).numpy()
    return extra


def _adapter_config(
    cfg: dict[str, Any],
    specs: list[ModuleSpec],
    saved_modules: Sequence[str],
    extra: Mapping[str, Any],
    projection_map: ProjectionMap,
) -> AdapterConfig:
    """Our config for PEFT's: ``alpha = r``, the saved modules that have tensors."""
    rank = int(cfg["r"])
    used = sorted({m for m in saved_modules if any(n.startswith(m + ".") for n in extra)})
    targets = cfg.get("target_modules")
    return AdapterConfig(
        seed=int(cfg["proj_seed"]),
        vector_length=int(cfg["theta_d_length"]),
        rank=rank,
        alpha=float(rank),
        modules=specs,
        target_modules=sorted(targets) if isinstance(targets, list) else targets,
        exclude_modules=cfg.get("exclude_modules"),
        modules_to_save=used,
        base_model_name_or_path=cfg.get("base_model_name_or_path"),
        init_range=float(cfg.get("init_theta_d_bound") or 0.02),
        projection=projection_map.kind,
        map_sha256=projection_map.sha256,
    )


def _write_adapter(
    out: Path,
    config: AdapterConfig,
    theta: npt.NDArray[np.float32],
    extra: Mapping[str, npt.NDArray[Any]],
    projection_map: ProjectionMap,
    overwrite: bool,
) -> None:
    """Writes the adapter into a staging folder and commits it to ``out``."""
    staging = _core.staging_folder(out, CONVERT_KIND, overwrite=overwrite)
    try:
        save_adapter(staging, config, theta, extra, projection_map)
        _core.commit_folder(staging, out, CONVERT_KIND, overwrite=overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
