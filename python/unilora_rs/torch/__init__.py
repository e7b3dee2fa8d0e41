"""Uni-LoRA training layer for torch and transformers models (needs torch).

>>> from unilora_rs.torch import UniLoRAConfig, get_unilora_model  # doctest: +SKIP
>>> model = get_unilora_model(base, UniLoRAConfig(rank=4, vector_length=23_040,
...                                               target_modules=["query", "value"]))

One float32 ``nn.Parameter`` ``theta_d`` is the only trainable tensor (plus any
``modules_to_save``); every LoRA matrix is a view of ``theta_D = P theta_d``, rebuilt
once per forward pass by the kernels in :mod:`unilora_rs.torch.ops`.
"""

from __future__ import annotations

from ..extras import require

try:
    import torch  # noqa: F401
except ImportError:  # pragma: no cover - exercised only without torch
    require("unilora_rs.torch")  # one line naming the extra to install
    raise  # installed but broken: the error itself

from .config import UniLoRAConfig
from .layers import UniLoRALayer
from .model import UniLoRAModel, get_unilora_model
from .ops import ProjectionParams, build_index_map, rebuild
from .targets import ALL_LINEAR, DEFAULT_TARGET_MODULES

__all__ = [
    "ALL_LINEAR",
    "DEFAULT_TARGET_MODULES",
    "ProjectionParams",
    "UniLoRAConfig",
    "UniLoRALayer",
    "UniLoRAModel",
    "build_index_map",
    "get_unilora_model",
    "rebuild",
]
