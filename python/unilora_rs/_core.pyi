"""Type stubs of the compiled extension ``unilora_rs._core``."""

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, final

import numpy as np
import numpy.typing as npt
from typing_extensions import disjoint_base

__all__ = [
    "MAX_THREADS",
    "SPEC_VERSION",
    "ExportResult",
    "MergeEachResult",
    "MergeResult",
    "MergedTensor",
    "PeftExportResult",
    "__version__",
    "check_adapter_config",
    "check_adapter_module",
    "commit_folder",
    "export_lora",
    "export_peft",
    "fastfood_params",
    "fingerprint",
    "get_num_threads",
    "load_adapter",
    "lora_factors",
    "map_sha256",
    "merge",
    "merge_each",
    "merge_weighted",
    "projection",
    "projection_params",
    "read_adapter_config",
    "reconstruct",
    "reconstruct_backward",
    "safetensors_header",
    "set_num_threads",
    "staging_folder",
    "temp_file_name",
    "thread_env_warning",
    "total_size",
]

__version__: str
SPEC_VERSION: int
MAX_THREADS: int

@final
class MergedTensor:
    """One adapted module and the base tensor it was merged into."""

    @property
    def module(self) -> str: ...
    @property
    def tensor(self) -> str: ...
    @property
    def file(self) -> str: ...
    def __eq__(self, value: object, /) -> bool: ...
    def __hash__(self) -> int: ...

@final
class MergeResult:
    """What a merge did."""

    @property
    def out(self) -> Path: ...
    @property
    def merged(self) -> list[MergedTensor]: ...
    @property
    def replaced(self) -> list[str]: ...
    @property
    def added(self) -> list[str]: ...
    @property
    def config_keys(self) -> list[str]: ...
    @property
    def cast(self) -> int: ...
    @property
    def copied(self) -> int: ...
    @property
    def tensors(self) -> int: ...
    @property
    def shards(self) -> list[str]: ...
    @property
    def other_files(self) -> list[str]: ...
    @property
    def left_out(self) -> list[str]: ...
    @property
    def warnings(self) -> list[str]: ...
    @property
    def bytes_written(self) -> int: ...
    @property
    def largest_tensor_bytes(self) -> int: ...
    @property
    def bytes_read(self) -> int: ...
    @property
    def dequantized(self) -> int: ...
    @property
    def seconds(self) -> float: ...
    @property
    def merged_count(self) -> int: ...
    def __eq__(self, value: object, /) -> bool: ...

@final
class MergeEachResult:
    """What merge_each did."""

    @property
    def results(self) -> list[MergeResult]: ...
    @property
    def bytes_read(self) -> int: ...
    @property
    def seconds(self) -> float: ...
    def __eq__(self, value: object, /) -> bool: ...

@disjoint_base
class ExportResult:
    """What an export wrote."""

    @property
    def out(self) -> Path: ...
    @property
    def modules(self) -> int: ...
    @property
    def saved_tensors(self) -> int: ...
    @property
    def lora_parameters(self) -> int: ...
    @property
    def weights_bytes(self) -> int: ...
    @property
    def saved_file(self) -> Path | None: ...
    @property
    def seconds(self) -> float: ...
    def __eq__(self, value: object, /) -> bool: ...

@final
class PeftExportResult(ExportResult):
    """What an export to PEFT's Uni-LoRA format wrote."""

    @property
    def notes(self) -> list[str]: ...

_Shapes = Sequence[tuple[int, int]] | Mapping[str, tuple[int, int]]
_Out = Sequence[npt.NDArray[np.float32]] | Mapping[str, npt.NDArray[np.float32]]

def projection(
    seed: int, total: int, d: int
) -> tuple[npt.NDArray[np.int32] | npt.NDArray[np.int64], npt.NDArray[np.float32]]: ...
def projection_params(seed: int, total: int, d: int) -> dict[str, Any]: ...
def total_size(shapes: _Shapes) -> int: ...
def reconstruct(
    vector: npt.ArrayLike,
    seed: int,
    shapes: _Shapes,
    *,
    out: _Out | None = None,
    projection: str = "sparse",
) -> list[npt.NDArray[np.float32]] | dict[str, npt.NDArray[np.float32]]: ...
def reconstruct_backward(
    grad: npt.ArrayLike, seed: int, d: int, *, projection: str = "sparse"
) -> npt.NDArray[np.float32]: ...
def fastfood_params(seed: int, total: int, d: int) -> dict[str, Any]: ...
def map_sha256(indices: npt.NDArray[np.int32], scales: npt.NDArray[np.float32]) -> str: ...
def fingerprint(seed: int, d: int, shapes: _Shapes) -> str: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def thread_env_warning() -> str | None: ...
def merge(
    base: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], object] | None = None,
    tile_elems: int = 0,
    fsync: bool = True,
) -> MergeResult: ...
def merge_each(
    base: str | os.PathLike[str],
    adapters: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], object] | None = None,
    tile_elems: int = 0,
    fsync: bool = True,
) -> MergeEachResult: ...
def merge_weighted(
    base: str | os.PathLike[str],
    adapters: Sequence[str | os.PathLike[str]],
    weights: Sequence[float],
    out: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], object] | None = None,
    tile_elems: int = 0,
    fsync: bool = True,
) -> MergeResult: ...
def export_lora(
    adapter: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dtype: str = "f32",
    overwrite: bool = False,
    saved_modules: str = "error",
) -> ExportResult: ...
def export_peft(
    adapter: str | os.PathLike[str], out: str | os.PathLike[str], *, overwrite: bool = False
) -> PeftExportResult: ...
def staging_folder(
    out: str | os.PathLike[str], kind: str, *, overwrite: bool = False
) -> os.PathLike[str]: ...
def temp_file_name(target: str | os.PathLike[str]) -> os.PathLike[str]: ...
def commit_folder(
    staging: str | os.PathLike[str],
    out: str | os.PathLike[str],
    kind: str,
    *,
    overwrite: bool = False,
) -> None: ...
def safetensors_header(
    path: str | os.PathLike[str],
) -> tuple[dict[str, str] | None, dict[str, tuple[str, list[int], tuple[int, int]]], int]: ...
def read_adapter_config(path: str | os.PathLike[str], *, verify: bool = True) -> dict[str, Any]: ...
def check_adapter_config(
    config: dict[str, Any],
    *,
    source: str | os.PathLike[str] | None = None,
    verify: bool = False,
) -> dict[str, Any]: ...
def check_adapter_module(module: dict[str, Any]) -> dict[str, Any]: ...
def load_adapter(
    path: str | os.PathLike[str], *, verify: bool = True
) -> tuple[
    dict[str, Any],
    npt.NDArray[np.float32],
    tuple[npt.NDArray[np.int32], npt.NDArray[np.float32], str] | None,
]: ...
def lora_factors(
    path: str | os.PathLike[str],
) -> list[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]]: ...
