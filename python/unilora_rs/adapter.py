"""The Uni-LoRA adapter directory format (numpy only; see docs/SPEC.md).

An adapter directory holds

* ``adapter_config.json``: format name/version, spec version, seed, ``d``
  (``vector_length``), rank, alpha, target rules, the resolved module list with shapes
  in flattening order, the fingerprint and the base model name;
* ``adapter_model.safetensors``: ``theta_d`` (float32 ``[d]``) plus, for
  ``modules_to_save``, full replacement tensors named as in the base model's state dict,
  and, for ``projection = "explicit"``, the map: ``theta_d.indices`` (int32 ``[D]``) and
  ``theta_d.scales`` (float32 ``[D]``).

``projection`` says how ``theta_D`` is made from ``theta_d``: ``"sparse"`` (the default,
spec v1), ``"fastfood"`` (spec v2), or a map bound by its SHA-256 (``map_sha256``):
``"explicit"`` (stored in the file) or ``"peft-numpy"`` (PEFT's Uni-LoRA map,
regenerated with numpy on load).

Module ``m`` with ``in_features`` / ``out_features`` contributes two matrices to
``theta_D``: ``B`` (``out x r``) then ``A`` (``r x in``), each row-major; the weight
update is ``W += (alpha / r) * B @ A`` (for ``kind == "conv1d"``, GPT-2's transposed
weights, ``W += (alpha / r) * (B @ A).T``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _core
from ._util import write_bytes_atomic
from ._version import __version__
from .errors import FormatError, InvalidArgumentError, VectorError

FORMAT_NAME = "unilora_rs"
FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
VECTOR_KEY = "theta_d"
MAP_INDICES_KEY = "theta_d.indices"
MAP_SCALES_KEY = "theta_d.scales"
MODULE_KINDS = ("linear", "conv1d")
#: Every ``projection`` of an adapter; the first two are generated from the seed, the
#: others are maps bound by their SHA-256.
PROJECTIONS = ("sparse", "fastfood", "explicit", "peft-numpy")

__all__ = [
    "CONFIG_NAME",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAP_INDICES_KEY",
    "MAP_SCALES_KEY",
    "PROJECTIONS",
    "VECTOR_KEY",
    "WEIGHTS_NAME",
    "AdapterConfig",
    "ModuleSpec",
    "ProjectionMap",
    "adapter_directory",
    "load_adapter",
    "load_adapter_config",
    "load_projection_map",
    "save_adapter",
]


@dataclass(frozen=True)
class ModuleSpec:
    """One adapted layer: its qualified name in the base model and its sizes.

    Checked by the same rules as ``adapter_config.json`` (the Rust validator): a
    non-empty name without control characters, sizes in ``[1, 2**64 - 1]``, ``kind``
    ``"linear"`` or ``"conv1d"``.
    """

    name: str
    in_features: int
    out_features: int
    kind: str = "linear"

    def __post_init__(self) -> None:
        _core.check_adapter_module(asdict(self))

    @property
    def weight_shape(self) -> tuple[int, int]:
        """Shape of the base weight: ``(out, in)`` for linear, ``(in, out)`` for conv1d."""
        if self.kind == "conv1d":
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features)


@dataclass
class AdapterConfig:
    """Contents of ``adapter_config.json``.

    Every config, read from a file or built here, is checked by the one validator the
    Rust merge and export use (``unilora_rs._core``), so the command line, this module
    and the torch layer accept and reject the same configs. An empty ``fingerprint``
    is filled in with the one seed, ``d`` and the module list give.
    """

    seed: int
    vector_length: int
    rank: int
    alpha: float
    modules: list[ModuleSpec]
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] = field(default_factory=list)
    base_model_name_or_path: str | None = None
    init_range: float = 0.02
    fingerprint: str = ""
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    #: 1 for the sparse projection, 2 for the others (``None``: the projection's).
    spec_version: int | None = None
    library_version: str | None = __version__
    #: One of :data:`PROJECTIONS`.
    projection: str = "sparse"
    #: ``"sha256:<hex>"`` of the map, for ``"explicit"`` and ``"peft-numpy"``.
    map_sha256: str | None = None
    #: What the trained model is for, so that a merge can rebuild it without the training
    #: code: ``{"type": "sequence-classification" | "causal-lm", "config": {keys set in
    #: the merged config.json (architectures, id2label, ...)}, "new_tensors": [tensors
    #: the base checkpoint lacks, written from the adapter, e.g. a new head]}``.
    task: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self._assign(self._checked())

    def _checked(self, *, verify: bool = False) -> dict[str, Any]:
        return _core.check_adapter_config(self.to_dict(), verify=verify)

    def _assign(self, checked: Mapping[str, Any]) -> None:
        for f in fields(self):
            if f.name in checked:  # the validator returns every key it knows
                value = checked[f.name]
                if f.name == "modules":
                    value = [ModuleSpec(**m) for m in value]
                setattr(self, f.name, value)

    @classmethod
    def _from_checked(cls, checked: Mapping[str, Any]) -> AdapterConfig:
        kwargs = {f.name: checked[f.name] for f in fields(cls) if f.name in checked}
        kwargs["modules"] = [ModuleSpec(**m) for m in checked["modules"]]
        return cls(**kwargs)

    @property
    def scaling(self) -> float:
        """The LoRA scaling ``alpha / r`` (1.0 by default, as in the paper)."""
        return float(self.alpha) / self.rank

    def matrix_shapes(self) -> dict[str, tuple[int, int]]:
        """The matrices of ``theta_D`` in flattening order: ``<name>.lora_B`` then ``.lora_A``."""
        return {name: (rows, cols) for name, rows, cols in self._checked()["matrices"]}

    @property
    def total_size(self) -> int:
        """``D``: the number of LoRA parameters represented."""
        return int(self._checked()["total_size"])

    def expected_fingerprint(self) -> str:
        """The fingerprint recomputed from seed, ``d`` and the module list."""
        return str(self._checked()["expected_fingerprint"])

    def verify(self) -> None:
        """Raises :class:`MismatchError` when the stored fingerprint does not match."""
        self._checked(verify=True)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (modules as a list of objects)."""
        out = asdict(self)
        if out["spec_version"] is None:
            out["spec_version"] = 1 if self.projection == "sparse" else 2
        for key, default in (("task", None), ("projection", "sparse"), ("map_sha256", None)):
            if out[key] == default:
                del out[key]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "adapter config") -> AdapterConfig:
        """Parses a dict as read from ``adapter_config.json`` (no fingerprint check);
        problems raise :class:`FormatError` naming ``source``."""
        return cls._from_checked(_core.check_adapter_config(dict(data), source=source))


@dataclass(frozen=True, eq=False)
class ProjectionMap:
    """An explicit projection map: ``theta_D[i] = theta_d[indices[i]] * scales[i]``,
    rows in the adapter's flattening order, with its SHA-256 (``map_sha256``)."""

    kind: str
    indices: npt.NDArray[np.int32]
    scales: npt.NDArray[np.float32]
    sha256: str

    @classmethod
    def of(cls, kind: str, indices: npt.ArrayLike, scales: npt.ArrayLike) -> ProjectionMap:
        """Wraps the arrays (int32 and float32, C order) with their SHA-256."""
        idx = np.ascontiguousarray(indices, dtype=np.int32)
        sc = np.ascontiguousarray(scales, dtype=np.float32)
        return cls(kind, idx, sc, _core.map_sha256(idx, sc))

    def file_tensors(self) -> dict[str, npt.NDArray[Any]]:
        """The tensors an adapter file holds for this map (only ``"explicit"`` keeps it)."""
        if self.kind != "explicit":
            return {}
        return {MAP_INDICES_KEY: self.indices, MAP_SCALES_KEY: self.scales}


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    write_bytes_atomic(path, data)


def _check_theta(theta: npt.NDArray[Any], d: int, source: str) -> npt.NDArray[np.float32]:
    if theta.dtype != np.float32:
        raise FormatError(f"{source}: {VECTOR_KEY} has dtype {theta.dtype}, expected float32")
    if theta.shape != (d,):
        raise VectorError(
            f"{source}: {VECTOR_KEY} has shape {theta.shape} but the config says d = {d}"
        )
    if not np.isfinite(theta).all():
        raise VectorError(f"{source}: {VECTOR_KEY} holds NaN or Inf")
    return theta


def save_adapter(
    directory: str | os.PathLike[str],
    config: AdapterConfig,
    theta: npt.ArrayLike,
    extra_tensors: Mapping[str, npt.NDArray[Any]] | None = None,
    projection_map: ProjectionMap | None = None,
) -> Path:
    """Writes ``adapter_config.json`` and ``adapter_model.safetensors`` atomically.

    ``extra_tensors`` are the ``modules_to_save`` replacements (numpy arrays named as
    in the base model's state dict); ``projection_map`` is the map of an ``"explicit"``
    adapter (written to the file).
    """
    from safetensors.numpy import save as st_save

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    vec = _check_theta(np.ascontiguousarray(theta), config.vector_length, "theta")
    config.verify()
    tensors: dict[str, npt.NDArray[Any]] = {VECTOR_KEY: vec}
    for name, arr in (extra_tensors or {}).items():
        if name in _RESERVED:
            raise InvalidArgumentError(f"extra tensor name {name!r} is reserved")
        tensors[name] = np.ascontiguousarray(arr)
    if config.projection == "explicit":
        if projection_map is None or projection_map.sha256 != config.map_sha256:
            raise InvalidArgumentError(
                "an adapter with projection 'explicit' is saved with its map, whose SHA-256 "
                f"is the config's map_sha256 ({config.map_sha256})"
            )
        tensors.update(projection_map.file_tensors())
    meta = {"format": FORMAT_NAME, "fingerprint": config.fingerprint}
    _atomic_write_bytes(out / WEIGHTS_NAME, st_save(tensors, metadata=meta))
    text = json.dumps(config.to_dict(), indent=2, sort_keys=False) + "\n"
    _atomic_write_bytes(out / CONFIG_NAME, text.encode())
    return out


_RESERVED = (VECTOR_KEY, MAP_INDICES_KEY, MAP_SCALES_KEY)


def adapter_directory(adapter: str | os.PathLike[str]) -> Path:
    """The adapter's folder, given the folder or its ``adapter_config.json``."""
    path = Path(adapter)
    return path.parent if path.name == CONFIG_NAME and not path.is_dir() else path


def load_adapter_config(adapter: str | os.PathLike[str], *, verify: bool = True) -> AdapterConfig:
    """Reads ``adapter_config.json`` from an adapter directory (or the file itself).

    With ``verify`` (the default) the fingerprint is recomputed and a mismatch raises
    :class:`MismatchError`; a malformed config raises :class:`FormatError`.
    """
    return AdapterConfig._from_checked(_core.read_adapter_config(Path(adapter), verify=verify))


def load_adapter(
    adapter: str | os.PathLike[str],
) -> tuple[AdapterConfig, npt.NDArray[np.float32], dict[str, npt.NDArray[Any]]]:
    """Loads ``(config, theta_d, extra_tensors)`` from an adapter directory, verified
    exactly as the Rust merge verifies it (see :func:`unilora_rs._core.load_adapter`)."""
    checked, theta, _map = _core.load_adapter(Path(adapter))
    config = AdapterConfig._from_checked(checked)
    weights = adapter_directory(adapter) / WEIGHTS_NAME
    _meta, tensors, _start = _core.safetensors_header(weights)
    names = [name for name in tensors if name not in _RESERVED]
    extra: dict[str, npt.NDArray[Any]] = {}
    if names:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(weights), framework="np") as f:
                extra = {name: f.get_tensor(name) for name in names}
        except (SafetensorError, TypeError) as err:
            raise FormatError(
                f"{weights}: cannot read the modules_to_save tensors ({err})"
            ) from err
    return config, theta, extra


def load_projection_map(adapter: str | os.PathLike[str]) -> ProjectionMap | None:
    """The explicit map of an adapter (``"explicit"``: read from its file;
    ``"peft-numpy"``: regenerated with numpy), checked against its ``map_sha256``, or
    ``None`` for the projections generated from the seed."""
    if load_adapter_config(adapter).projection not in ("explicit", "peft-numpy"):
        return None
    checked, _theta, arrays = _core.load_adapter(Path(adapter))
    if arrays is None:  # pragma: no cover - the core returns a map for these kinds
        return None
    indices, scales, sha256 = arrays
    return ProjectionMap(str(checked["projection"]), indices, scales, sha256)
