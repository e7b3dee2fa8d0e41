"""Which modules of a model an adapter adapts or saves in full: PEFT's matching rules
(names, suffixes, a regex, ``"all-linear"``), the default targets per model type, and the
model's modules as if no adapter were there (:func:`plain_named_modules`, and where a
module of that plain model is held: :func:`parent_of`, :func:`module_at`)."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Protocol

from torch import nn

from ..errors import InvalidArgumentError
from .layers import UniLoRALayer
from .modules_to_save import ModulesToSaveWrapper

__all__ = [
    "ALL_LINEAR",
    "DEFAULT_TARGET_MODULES",
    "TargetSelection",
    "find_modules_to_save",
    "find_targets",
    "module_at",
    "module_features",
    "module_kind",
    "name_matches",
    "parent_of",
    "plain_named_modules",
    "target_rule",
]

#: The special ``target_modules`` value: every Linear / Conv1D except the output layer.
ALL_LINEAR = "all-linear"

#: Default targets by ``model.config.model_type`` when ``target_modules`` is not given
#: (the query and value projections, as in the paper's GLUE and instruction runs).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "t5": ["q", "v"],
}


class TargetSelection(Protocol):
    """The fields of a configuration that select modules (:class:`UniLoRAConfig`'s)."""

    @property
    def target_modules(self) -> list[str] | str | None: ...

    @property
    def exclude_modules(self) -> list[str] | str | None: ...

    @property
    def modules_to_save(self) -> list[str] | None: ...


def plain_named_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` as if no adapter were there: a :class:`UniLoRALayer`
    counts as its base layer and a :class:`ModulesToSaveWrapper` as its original module,
    under the name the module had in the plain model."""
    seen: set[int] = set()

    def walk(module: nn.Module, name: str) -> Iterator[tuple[str, nn.Module]]:
        if isinstance(module, UniLoRALayer):
            module = module.base_layer
        elif isinstance(module, ModulesToSaveWrapper):
            module = module.original_module
        if id(module) in seen:
            return
        seen.add(id(module))
        yield name, module
        for child_name, child in module._modules.items():
            if child is not None:
                yield from walk(child, f"{name}.{child_name}" if name else child_name)

    yield from walk(model, prefix)


def name_matches(name: str, rule: list[str] | str) -> bool:
    """PEFT's rule: a string is a regex matched against the whole qualified name; a list
    matches a name equal to one of its entries or ending with ``"." + entry``."""
    if isinstance(rule, str):
        return re.fullmatch(rule, name) is not None
    return any(name == t or name.endswith("." + t) for t in rule)


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional
        return None
    return Conv1D


def module_kind(module: nn.Module) -> str | None:
    """``"linear"`` for ``nn.Linear``, ``"conv1d"`` for GPT-2's ``Conv1D``, else ``None``."""
    if isinstance(module, nn.Linear):
        return "linear"
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    return None


def module_features(module: nn.Module, kind: str) -> tuple[int, int]:
    """``(in_features, out_features)`` of a Linear / Conv1D layer (a quantized Linear's
    packed weight has another shape: its ``in_features`` / ``out_features`` count)."""
    if kind == "linear" and isinstance(module, nn.Linear):
        return int(module.in_features), int(module.out_features)
    weight = module.weight  # type: ignore[union-attr]
    if kind == "conv1d":
        return int(weight.shape[0]), int(weight.shape[1])
    return int(weight.shape[1]), int(weight.shape[0])


def find_modules_to_save(model: nn.Module, config: TargetSelection) -> list[str]:
    """Qualified names of the modules matching ``modules_to_save`` (outermost matches only)."""
    if not config.modules_to_save:
        return []
    found: list[str] = []
    for name, _ in plain_named_modules(model):
        if not name or any(name.startswith(f + ".") for f in found):
            continue
        if name_matches(name, config.modules_to_save):
            found.append(name)
    missing = [t for t in config.modules_to_save if not any(name_matches(n, [t]) for n in found)]
    if missing:
        raise InvalidArgumentError(f"modules_to_save: no module of the model is named {missing}")
    return found


def _output_layer_names(model: nn.Module) -> set[str]:
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is None:
        return set()
    # A wrapped output layer counts as the module it wraps.
    inner = {id(out)} | {
        id(m)
        for m in (getattr(out, "base_layer", None), getattr(out, "original_module", None))
        if m is not None
    }
    return {name for name, mod in plain_named_modules(model) if id(mod) in inner}


def target_rule(model: nn.Module, config: TargetSelection) -> list[str] | str:
    """``config.target_modules``, or the default targets of the model type when it is
    ``None`` (:data:`DEFAULT_TARGET_MODULES`)."""
    if config.target_modules is not None:
        return config.target_modules
    return list(_default_targets(model))


def _default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGET_MODULES:
        return DEFAULT_TARGET_MODULES[model_type]
    raise InvalidArgumentError(
        f"target_modules is not set and model type {model_type!r} has no default; "
        "pass target_modules (a list of module names, a regex, or 'all-linear')"
    )


def find_targets(
    model: nn.Module, config: TargetSelection, saved: Sequence[str] = ()
) -> Iterator[tuple[str, nn.Module, str]]:
    """``(qualified name, module, kind)`` of every layer to adapt, in ``named_modules`` order.

    Modules inside ``saved`` (the modules_to_save) are never adapted; a module that matches
    the rules but is not a Linear / Conv1D raises :class:`InvalidArgumentError`. Names
    and modules are those of the model without adapters (:func:`plain_named_modules`),
    so that other adapters of the model change nothing.
    """
    rule = target_rule(model, config)
    outputs = _output_layer_names(model) if rule == ALL_LINEAR else set()
    for name, module in plain_named_modules(model):
        if not name or name in outputs:
            continue
        if any(name == s or name.startswith(s + ".") for s in saved):
            continue
        kind = module_kind(module)
        matched = kind is not None if rule == ALL_LINEAR else name_matches(name, rule)
        if not matched:
            continue
        if config.exclude_modules is not None and name_matches(name, config.exclude_modules):
            continue
        if kind is None:
            suffix_only = isinstance(rule, list) and not any(name == t for t in rule)
            if suffix_only and any(True for _ in module.children()):
                # A suffix that also names a container (e.g. "attn"): only leaves are targets.
                continue
            raise InvalidArgumentError(
                f"module {name!r} ({type(module).__name__}) matches target_modules but only "
                "nn.Linear and GPT-2 Conv1D layers can be adapted"
            )
        yield name, module, kind


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding the module named ``name`` (a name of the plain model) and the
    attribute it is held under; a wrapper's own module counts as the parent's."""
    parent_name, _, child = name.rpartition(".")
    parent = dict(plain_named_modules(model))[parent_name]
    return parent, child


def module_at(model: nn.Module, name: str) -> nn.Module:
    """The module held at ``name`` now (a Uni-LoRA layer or modules_to_save wrapper
    where one was put)."""
    parent, child = parent_of(model, name)
    return parent._modules[child]  # type: ignore[return-value]
