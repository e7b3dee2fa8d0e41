"""The Uni-LoRA adapter directory format (numpy only; see docs/SPEC.md).

An adapter directory holds

* ``adapter_config.json``: format name/version, spec version, seed, ``d``
  (``vector_length``), rank, alpha, target rules, the resolved module list with shapes
  in flattening order, the fingerprint and the base model name;
* ``adapter_model.safetensors``: ``theta_d`` (float32 ``[d]``) plus, for
  ``modules_to_save``, full replacement tensors named as in the base model's state dict.

Module ``m`` with ``in_features`` / ``out_features`` contributes two matrices to
``theta_D``: ``B`` (``out x r``) then ``A`` (``r x in``), each row-major; the weight
update is ``W += (alpha / r) * B @ A`` (for ``kind == "conv1d"``, GPT-2's transposed
weights, ``W += (alpha / r) * (B @ A).T``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from . import __version__, fingerprint
from .errors import FormatError, InvalidArgumentError, MismatchError, VectorError

FORMAT_NAME = "unilora_rs"
FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
VECTOR_KEY = "theta_d"
MODULE_KINDS = ("linear", "conv1d")

__all__ = [
    "CONFIG_NAME",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "VECTOR_KEY",
    "WEIGHTS_NAME",
    "AdapterConfig",
    "ModuleSpec",
    "load_adapter",
    "load_adapter_config",
    "save_adapter",
]


@dataclass(frozen=True)
class ModuleSpec:
    """One adapted layer: its qualified name in the base model and its sizes."""

    name: str
    in_features: int
    out_features: int
    kind: str = "linear"

    def __post_init__(self) -> None:
        if not self.name:
            raise InvalidArgumentError("module name must not be empty")
        if self.kind not in MODULE_KINDS:
            raise InvalidArgumentError(
                f"module {self.name!r}: kind {self.kind!r} is not one of {', '.join(MODULE_KINDS)}"
            )
        for attr in ("in_features", "out_features"):
            v = getattr(self, attr)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise InvalidArgumentError(f"module {self.name!r}: {attr} must be >= 1, got {v!r}")

    @property
    def weight_shape(self) -> tuple[int, int]:
        """Shape of the base weight: ``(out, in)`` for linear, ``(in, out)`` for conv1d."""
        if self.kind == "conv1d":
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features)


@dataclass
class AdapterConfig:
    """Contents of ``adapter_config.json``."""

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
    spec_version: int = 1
    library_version: str = __version__
    #: What the trained model is for, so that a merge can rebuild it without the training
    #: code: ``{"type": "sequence-classification" | "causal-lm", "config": {keys set in
    #: the merged config.json (architectures, id2label, ...)}, "new_tensors": [tensors
    #: the base checkpoint lacks, written from the adapter, e.g. a new head]}``.
    task: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise InvalidArgumentError(f"rank must be a positive integer, got {self.rank!r}")
        if not isinstance(self.vector_length, int) or self.vector_length <= 0:
            raise InvalidArgumentError(
                f"vector_length (d) must be >= 1, got {self.vector_length!r}"
            )
        if not self.modules:
            raise InvalidArgumentError("an adapter needs at least one module")
        names = [m.name for m in self.modules]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise InvalidArgumentError(f"module {dup!r} is listed twice")
        if self.vector_length > self.total_size:
            raise InvalidArgumentError(
                f"d = {self.vector_length} is larger than D = {self.total_size} "
                "(the LoRA parameter count of the listed modules)"
            )
        if not self.fingerprint:
            self.fingerprint = self.expected_fingerprint()

    @property
    def scaling(self) -> float:
        """The LoRA scaling ``alpha / r`` (1.0 by default, as in the paper)."""
        return float(self.alpha) / self.rank

    def matrix_shapes(self) -> dict[str, tuple[int, int]]:
        """The matrices of ``theta_D`` in flattening order: ``<name>.lora_B`` then ``.lora_A``."""
        r = self.rank
        shapes: dict[str, tuple[int, int]] = {}
        for m in self.modules:
            shapes[f"{m.name}.lora_B"] = (m.out_features, r)
            shapes[f"{m.name}.lora_A"] = (r, m.in_features)
        return shapes

    @property
    def total_size(self) -> int:
        """``D``: the number of LoRA parameters represented."""
        return sum(self.rank * (m.in_features + m.out_features) for m in self.modules)

    def expected_fingerprint(self) -> str:
        """The fingerprint recomputed from seed, ``d`` and the module list."""
        return fingerprint(self.seed, self.vector_length, self.matrix_shapes())

    def verify(self) -> None:
        """Raises :class:`MismatchError` when the stored fingerprint does not match."""
        expected = self.expected_fingerprint()
        if self.fingerprint != expected:
            raise MismatchError(
                "adapter fingerprint mismatch: the config records "
                f"{self.fingerprint} but seed={self.seed}, d={self.vector_length} and the "
                f"{len(self.modules)} listed modules give {expected}; the seed, d or module "
                "list was changed after training, so theta_d would rebuild the wrong matrices"
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (modules as a list of objects)."""
        out = asdict(self)
        out["modules"] = [asdict(m) for m in self.modules]
        if out["task"] is None:
            del out["task"]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "adapter config") -> AdapterConfig:
        """Parses a dict as read from ``adapter_config.json`` (no fingerprint check)."""
        if data.get("format") != FORMAT_NAME:
            raise FormatError(
                f"{source}: not a unilora_rs adapter (format = {data.get('format')!r}, "
                f"expected {FORMAT_NAME!r})"
            )
        if int(data.get("format_version", 0)) > FORMAT_VERSION:
            raise FormatError(
                f"{source}: format_version {data['format_version']} is newer than this "
                f"unilora_rs ({FORMAT_VERSION}); upgrade unilora_rs"
            )
        if int(data.get("spec_version", 0)) != 1:
            raise FormatError(
                f"{source}: unsupported generator spec_version {data.get('spec_version')!r}"
            )
        try:
            modules = [ModuleSpec(**m) for m in data["modules"]]
            known = {f for f in cls.__dataclass_fields__}
            kwargs = {k: v for k, v in data.items() if k in known and k != "modules"}
            return cls(modules=modules, **kwargs)
        except (KeyError, TypeError) as err:
            raise FormatError(f"{source}: malformed adapter config ({err})") from err


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
) -> Path:
    """Writes ``adapter_config.json`` and ``adapter_model.safetensors`` atomically.

    ``extra_tensors`` are the ``modules_to_save`` replacements (numpy arrays named as
    in the base model's state dict).
    """
    from safetensors.numpy import save as st_save

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    vec = _check_theta(np.ascontiguousarray(theta), config.vector_length, "theta")
    config.verify()
    tensors: dict[str, npt.NDArray[Any]] = {VECTOR_KEY: vec}
    for name, arr in (extra_tensors or {}).items():
        if name == VECTOR_KEY:
            raise InvalidArgumentError(f"extra tensor name {VECTOR_KEY!r} is reserved")
        tensors[name] = np.ascontiguousarray(arr)
    meta = {"format": FORMAT_NAME, "fingerprint": config.fingerprint}
    _atomic_write_bytes(out / WEIGHTS_NAME, st_save(tensors, metadata=meta))
    text = json.dumps(config.to_dict(), indent=2, sort_keys=False) + "\n"
    _atomic_write_bytes(out / CONFIG_NAME, text.encode())
    return out


def _config_path(adapter: str | os.PathLike[str]) -> Path:
    path = Path(adapter)
    if path.is_dir():
        path = path / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(2, "adapter config not found", str(path))
    return path


def load_adapter_config(adapter: str | os.PathLike[str], *, verify: bool = True) -> AdapterConfig:
    """Reads ``adapter_config.json`` from an adapter directory (or the file itself).

    With ``verify`` (the default) the fingerprint is recomputed and a mismatch raises
    :class:`MismatchError`.
    """
    path = _config_path(adapter)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FormatError(f"{path}: invalid JSON ({err})") from err
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object")
    config = AdapterConfig.from_dict(data, source=str(path))
    if verify:
        config.verify()
    return config


def load_adapter(
    adapter: str | os.PathLike[str],
) -> tuple[AdapterConfig, npt.NDArray[np.float32], dict[str, npt.NDArray[Any]]]:
    """Loads ``(config, theta_d, extra_tensors)`` from an adapter directory, verified."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    config = load_adapter_config(adapter)
    weights = Path(adapter) / WEIGHTS_NAME
    if not weights.exists():
        raise FileNotFoundError(2, "adapter weights not found", str(weights))
    try:
        tensors = load_file(str(weights))
    except SafetensorError as err:
        raise FormatError(f"{weights}: corrupt safetensors file ({err})") from err
    if VECTOR_KEY not in tensors:
        raise FormatError(f"{weights}: no {VECTOR_KEY!r} tensor")
    theta = _check_theta(tensors.pop(VECTOR_KEY), config.vector_length, str(weights))
    return config, theta, tensors


def module_specs(items: Sequence[tuple[str, int, int, str]]) -> list[ModuleSpec]:
    """Builds specs from ``(name, in_features, out_features, kind)`` tuples."""
    return [ModuleSpec(name, fi, fo, kind) for name, fi, fo, kind in items]
