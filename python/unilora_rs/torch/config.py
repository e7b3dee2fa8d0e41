"""``UniLoRAConfig``: the hyper-parameters of one Uni-LoRA adapter, checked when made.

The rules that turn its ``target_modules`` / ``exclude_modules`` / ``modules_to_save``
into module names live in :mod:`unilora_rs.torch.targets` (re-exported here)."""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from ..adapter import PROJECTIONS, AdapterConfig, ProjectionMap
from ..errors import InvalidArgumentError
from .ops import BACKENDS, GENERATED_PROJECTIONS, INDEX_MODES
from .targets import (
    ALL_LINEAR,
    DEFAULT_TARGET_MODULES,
    find_modules_to_save,
    find_targets,
    module_features,
    module_kind,
    name_matches,
    plain_named_modules,
    target_rule,
)

__all__ = [
    "ALL_LINEAR",
    "DEFAULT_TARGET_MODULES",
    "PEFT_ARGUMENT_NAMES",
    "UniLoRAConfig",
    "find_modules_to_save",
    "find_targets",
    "module_features",
    "module_kind",
    "name_matches",
    "plain_named_modules",
    "target_rule",
]

#: PEFT's ``UniLoraConfig`` argument names and the matching ones here.
PEFT_ARGUMENT_NAMES: dict[str, str] = {
    "r": "rank",
    "theta_d_length": "vector_length",
    "proj_seed": "seed",
    "init_theta_d_bound": "init_range",
    "unilora_dropout": "dropout",
}


@dataclass
class UniLoRAConfig:
    """Hyper-parameters of a Uni-LoRA adapter (see docs/TRAINING.md for working defaults).

    Args:
        rank: LoRA rank ``r`` of every adapted matrix pair.
        vector_length: ``d``, the length of the single trainable vector ``theta_d``
            (the paper uses 23,040 for RoBERTa-base q,v and 2^19 for 7B all-linear).
        seed: seed of the projection (any u64); recorded in the adapter.
        alpha: LoRA alpha; the update is scaled by ``alpha / rank``. ``None`` means
            ``alpha = rank`` (factor 1, as in the paper: the ``1/sqrt(n_j)`` scales carry it).
        target_modules: which layers to adapt, with PEFT's rules: a list of exact
            module names or name suffixes (``"q_proj"`` matches
            ``model.layers.0.self_attn.q_proj``), a regex string (full match of the
            qualified name), or ``"all-linear"``
            (every ``nn.Linear`` / GPT-2 ``Conv1D`` except the output layer). ``None`` uses
            :data:`DEFAULT_TARGET_MODULES` for the model type.
        exclude_modules: names / suffixes (list) or a regex (string) never adapted.
        modules_to_save: modules (names or suffixes, e.g. ``["classifier"]``) trained in
            full and stored in the adapter, typically task heads.
        init_range: ``theta_d`` starts as ``U(-init_range, init_range)`` (0 gives zero gradients).
        dropout: dropout probability on the input of the LoRA branch.
        index_mode: ``"on_the_fly"`` (indices computed from the seed in every pass, no
            index tensor) or ``"cached"`` (an int32 map of ``D`` entries, for comparison).
        backend: ``"auto"`` (Triton on CUDA, the Rust core on CPU), ``"triton"``,
            ``"rust"`` or ``"torch"`` (int64 torch ops, any device).
        base_model_name_or_path: recorded in the adapter (informative).
        projection: how ``theta_D`` is made from ``theta_d``: ``"sparse"`` (default, the
            balanced map of spec v1) or ``"fastfood"`` (the paper's dense Fastfood map,
            docs/SPEC.md section 4). Adapters converted from PEFT load with
            ``"explicit"`` or ``"peft-numpy"`` and their ``projection_map``.
        projection_map: the map of an ``"explicit"`` or ``"peft-numpy"`` adapter (set by
            :meth:`UniLoRAModel.from_pretrained`).

    PEFT's argument names (``r``, ``theta_d_length``, ...) raise an error naming the
    argument to use instead (:data:`PEFT_ARGUMENT_NAMES`).
    """

    rank: int = 4
    vector_length: int = 2**19
    seed: int = 0
    alpha: float | None = None
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    init_range: float = 0.02
    dropout: float = 0.0
    index_mode: str = "on_the_fly"
    backend: str = "auto"
    base_model_name_or_path: str | None = None
    projection: str = "sparse"
    projection_map: ProjectionMap | None = field(default=None, repr=False, compare=False)

    def __new__(cls, *args: Any, **kwargs: Any) -> UniLoRAConfig:
        known = [f for f in cls.__dataclass_fields__]
        for name in kwargs:
            if name in PEFT_ARGUMENT_NAMES:
                raise InvalidArgumentError(
                    f"UniLoRAConfig has no argument {name!r} (PEFT's UniLoraConfig name); "
                    f"use {PEFT_ARGUMENT_NAMES[name]}= instead (docs/TRAINING.md maps PEFT's "
                    "names to ours)"
                )
            if name not in known:
                raise InvalidArgumentError(
                    f"UniLoRAConfig got an unknown argument {name!r}; valid arguments: "
                    + ", ".join(known)
                )
        return super().__new__(cls)

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise InvalidArgumentError(f"rank must be a positive integer, got {self.rank!r}")
        d = self.vector_length
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise InvalidArgumentError(f"vector_length (d) must be a positive integer, got {d!r}")
        if (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not 0 <= self.seed < 2**64
        ):
            raise InvalidArgumentError(
                f"seed must be an integer in [0, 2**64 - 1], got {self.seed!r}"
            )
        if self.alpha is None:
            self.alpha = float(self.rank)
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise InvalidArgumentError(f"alpha must be a finite number, got {self.alpha!r}")
        self.alpha = float(self.alpha)
        if not self.init_range > 0:
            raise InvalidArgumentError(
                "init_range must be > 0 (theta_d = 0 gives zero gradients), "
                f"got {self.init_range!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise InvalidArgumentError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.index_mode not in INDEX_MODES:
            raise InvalidArgumentError(
                f"index_mode {self.index_mode!r} is not one of {', '.join(INDEX_MODES)}"
            )
        if self.backend not in BACKENDS:
            raise InvalidArgumentError(
                f"backend {self.backend!r} is not one of {', '.join(BACKENDS)}"
            )
        if self.projection not in PROJECTIONS:
            raise InvalidArgumentError(
                f"projection {self.projection!r} is not one of {', '.join(map(repr, PROJECTIONS))}"
            )
        if (self.projection not in GENERATED_PROJECTIONS) != (self.projection_map is not None):
            raise InvalidArgumentError(
                f"projection {self.projection!r}: new adapters use 'sparse' or 'fastfood'; "
                "'explicit' and 'peft-numpy' come with their projection_map from a saved "
                "adapter (UniLoRAModel.from_pretrained)"
            )
        self.target_modules = _check_rule("target_modules", self.target_modules)
        self.exclude_modules = _check_rule("exclude_modules", self.exclude_modules)
        mts = _check_rule("modules_to_save", self.modules_to_save)
        if isinstance(mts, str):
            raise InvalidArgumentError("modules_to_save must be a list of module names")
        self.modules_to_save = mts

    @property
    def scaling(self) -> float:
        """``alpha / rank``."""
        return float(self.alpha) / self.rank  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the user-facing fields (not the map's arrays)."""
        return {
            f.name: copy.deepcopy(getattr(self, f.name))
            for f in fields(self)
            if f.name != "projection_map"
        }

    @classmethod
    def from_adapter_config(cls, cfg: AdapterConfig, **overrides: Any) -> UniLoRAConfig:
        """The training config an adapter was made with (runtime options may be overridden)."""
        kwargs: dict[str, Any] = {
            "rank": cfg.rank,
            "vector_length": cfg.vector_length,
            "seed": cfg.seed,
            "alpha": cfg.alpha,
            "modules_to_save": list(cfg.modules_to_save) or None,
            "init_range": cfg.init_range,
            "base_model_name_or_path": cfg.base_model_name_or_path,
            "projection": cfg.projection,
        }
        kwargs.update(overrides)
        config = cls(**kwargs)
        # A saved adapter's module list is what counts; its matching rules are kept as
        # recorded (checked for type by the adapter config validator, not recompiled).
        config.target_modules = overrides.get("target_modules", cfg.target_modules)
        config.exclude_modules = overrides.get("exclude_modules", cfg.exclude_modules)
        return config


def _check_rule(label: str, rule: object) -> list[str] | str | None:
    if rule is None:
        return None
    if isinstance(rule, str):
        if rule != ALL_LINEAR or label != "target_modules":
            try:
                re.compile(rule)
            except re.error as err:
                raise InvalidArgumentError(
                    f"{label}: invalid regular expression {rule!r} ({err})"
                ) from err
        return rule
    if isinstance(rule, (Sequence, set, frozenset)):
        items = list(rule)
        if not all(isinstance(x, str) and x for x in items):
            raise InvalidArgumentError(f"{label} must hold non-empty strings, got {rule!r}")
        if label == "target_modules" and not items:
            raise InvalidArgumentError("target_modules is empty: name at least one module")
        return items
    raise InvalidArgumentError(
        f"{label} must be a list of names, a regex string or None, got {type(rule).__name__}"
    )
