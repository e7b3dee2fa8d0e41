"""unilora_rs: Uni-LoRA adapters with a frozen, portable projection generator.

This package needs only numpy; the torch training layer lives in
:mod:`unilora_rs.torch` and is imported only on request. The functions live in
:mod:`unilora_rs.numpy_api` (projection and reconstruction), :mod:`unilora_rs.adapter`
(the adapter folder), :mod:`unilora_rs.merging` (merges into a checkpoint),
:mod:`unilora_rs.inspection` (what an adapter holds), :mod:`unilora_rs.export` (LoRA,
PEFT and GGUF exports) and :mod:`unilora_rs.peft_interop` (PEFT's Uni-LoRA adapters
in); their reports are in :mod:`unilora_rs.reports`.

>>> import numpy as np, unilora_rs as ur
>>> theta = np.full(8, 0.5, dtype=np.float32)
>>> mats = ur.reconstruct(theta, seed=0, shapes=[(4, 4), (2, 3)])
>>> [m.shape for m in mats]
[(4, 4), (2, 3)]
"""

from __future__ import annotations

from . import _core
from ._util import warn_at_importer as _warn_at_importer
from ._version import SPEC_VERSION, __version__
from .adapter import AdapterConfig, ModuleSpec, load_adapter, load_adapter_config
from .errors import (
    DtypeError,
    FormatError,
    InternalError,
    InvalidArgumentError,
    MismatchError,
    MissingDependencyError,
    UniLoraError,
    UniLoraWarning,
    VectorError,
)
from .export import GgufExportResult, export_gguf, export_lora, export_peft
from .inspection import AdapterInfo, inspect
from .merging import merge, merge_each, merge_weighted
from .numpy_api import (
    MAX_THREADS,
    fingerprint,
    get_num_threads,
    projection,
    reconstruct,
    reconstruct_backward,
    set_num_threads,
    total_size,
)
from .peft_interop import convert_peft
from .reports import ExportResult, MergedTensor, MergeEachResult, MergeResult

__all__ = [
    "MAX_THREADS",
    "SPEC_VERSION",
    "AdapterConfig",
    "AdapterInfo",
    "DtypeError",
    "ExportResult",
    "FormatError",
    "GgufExportResult",
    "InternalError",
    "InvalidArgumentError",
    "MergeEachResult",
    "MergeResult",
    "MergedTensor",
    "MismatchError",
    "MissingDependencyError",
    "ModuleSpec",
    "UniLoraError",
    "UniLoraWarning",
    "VectorError",
    "__version__",
    "convert_peft",
    "export_gguf",
    "export_lora",
    "export_peft",
    "fingerprint",
    "get_num_threads",
    "inspect",
    "load_adapter",
    "load_adapter_config",
    "merge",
    "merge_each",
    "merge_weighted",
    "projection",
    "reconstruct",
    "reconstruct_backward",
    "set_num_threads",
    "total_size",
]

# An ignored or clamped UNILORA_NUM_THREADS, warned here rather than while the core is
# imported (that warning named importlib's frame), at the line that imported the package.
if (_notice := _core.thread_env_warning()) is not None:
    _warn_at_importer(_notice, RuntimeWarning)
