"""Putting adapters into the base model and taking them out (PEFT's ``inject_adapter`` /
``_create_and_replace`` / ``delete_adapter``): the modules an adapter adapts
(:func:`plan_specs`, also what parameter counts use), the checks that keep adapters from
overlapping, and wrapping / unwrapping the layers and modules_to_save.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from torch import nn

from ..adapter import ModuleSpec
from ..errors import InvalidArgumentError, MismatchError
from .cache import ThetaDCache
from .config import UniLoRAConfig
from .context import AdapterContext
from .layers import Branch, UniLoRALayer
from .merging import unmerge
from .modules_to_save import ModulesToSaveWrapper
from .ops import make_projection
from .registry import AdapterEntry, AdapterRegistry, adapter_record
from .targets import (
    find_modules_to_save,
    find_targets,
    module_at,
    module_features,
    module_kind,
    parent_of,
    plain_named_modules,
)

__all__ = [
    "delete_adapter",
    "inject_adapter",
    "lora_size",
    "plan_specs",
    "refuse_wrapped",
    "resolve_saved",
]

_W = TypeVar("_W", UniLoRALayer, ModulesToSaveWrapper)


def plan_specs(
    model: nn.Module, config: UniLoRAConfig, saved: Sequence[str] = ()
) -> list[ModuleSpec]:
    """The modules ``config`` adapts in ``model`` (outside ``saved``, the modules_to_save),
    in flattening order, with their kinds and shapes; nothing is wrapped."""
    specs = []
    for name, module, kind in find_targets(model, config, saved):
        fan_in, fan_out = module_features(module, kind)
        specs.append(ModuleSpec(name, fan_in, fan_out, kind))
    return specs


def lora_size(specs: Sequence[ModuleSpec], rank: int) -> int:
    """``D``: the LoRA parameters of ``specs`` at ``rank`` (``r * (in + out)`` each)."""
    return rank * sum(s.in_features + s.out_features for s in specs)


def _suggest_d(total: int) -> int:
    return max(1, min(total, 2 ** max(0, (total // 10).bit_length() - 1)))


# ---------------------------------------------------------------------------- checks


def refuse_wrapped(model: nn.Module) -> None:
    """Refuses a model that already holds Uni-LoRA layers or another tuner's (PEFT)."""
    if any(isinstance(m, (UniLoRALayer, ModulesToSaveWrapper)) for m in model.modules()):
        raise InvalidArgumentError("the model already holds Uni-LoRA layers")
    peft_layers = sorted(
        {type(m).__name__ for m in model.modules() if type(m).__module__.startswith("peft.")}
    )
    if peft_layers or hasattr(model, "peft_config"):
        raise InvalidArgumentError(
            f"the model already holds PEFT layers ({', '.join(peft_layers) or 'a PEFT model'}); "
            "Uni-LoRA does not stack on another tuner: give get_unilora_model the base model, "
            "or merge_and_unload() the PEFT model first"
        )


def resolve_saved(
    model: nn.Module,
    config: UniLoRAConfig,
    expected: Sequence[str] | None = None,
    source: object = None,
) -> list[str]:
    """The modules_to_save of ``config`` in ``model``; with ``expected`` (a saved
    adapter's list, read from ``source``), a :class:`MismatchError` when they differ."""
    saved = find_modules_to_save(model, config)
    if expected is not None and sorted(saved) != sorted(expected):
        raise MismatchError(
            f"{source}: modules_to_save {list(expected)} resolve to {saved} in this model"
        )
    return saved


def _check_saved_overlap(registry: AdapterRegistry, saved: Sequence[str]) -> None:
    """A module is either saved in full or adapted, and saved modules do not nest."""
    layer_names = {
        layer.branches[e.name].spec.name for e in registry.entries.values() for layer in e.layers
    }
    wrapped = {s for e in registry.entries.values() for s in e.saved}
    for s in saved:
        inside = [n for n in layer_names if n == s or n.startswith(s + ".")]
        if inside:
            raise InvalidArgumentError(
                f"modules_to_save {s!r} holds layers another adapter adapts ({inside[0]!r}); "
                "a module is either saved in full or adapted"
            )
        outer = [w for w in wrapped if s != w and (s.startswith(w + ".") or w.startswith(s + "."))]
        if outer:
            raise InvalidArgumentError(
                f"modules_to_save {s!r} overlaps {outer[0]!r}, saved by another adapter; "
                "save the same module in both"
            )


def _check_outside_saved(registry: AdapterRegistry, specs: Sequence[ModuleSpec]) -> None:
    """No adapted module lies inside a module another adapter saves in full."""
    wrapped = {s for e in registry.entries.values() for s in e.saved}
    for spec in specs:
        owner = [w for w in wrapped if spec.name == w or spec.name.startswith(w + ".")]
        if owner:
            raise InvalidArgumentError(
                f"module {spec.name!r} is inside {owner[0]!r}, which another adapter saves "
                "in full (modules_to_save); exclude it or save the module in this adapter too"
            )


def _check_modules_exist(model: nn.Module, specs: Sequence[ModuleSpec]) -> None:
    """A saved adapter's modules exist in ``model`` with the recorded kind and shapes."""
    plain = dict(plain_named_modules(model))
    for spec in specs:
        module = plain.get(spec.name)
        if module is None:
            raise MismatchError(
                f"adapter module {spec.name!r} does not exist in the base model "
                f"({type(model).__name__}); is this the base model the adapter was trained on?"
            )
        kind = module_kind(module)
        if kind != spec.kind:
            raise MismatchError(
                f"adapter module {spec.name!r} is {spec.kind!r} but the base model has a "
                f"{type(module).__name__} there"
            )
        fan_in, fan_out = module_features(module, kind)
        if (fan_in, fan_out) != (spec.in_features, spec.out_features):
            raise MismatchError(
                f"adapter module {spec.name!r} was trained on in={spec.in_features}, "
                f"out={spec.out_features} but the base model's layer has in={fan_in}, out={fan_out}"
            )


def _specs(
    model: nn.Module,
    config: UniLoRAConfig,
    saved: Sequence[str],
    modules: Sequence[ModuleSpec] | None,
) -> list[ModuleSpec]:
    """``modules`` (a saved adapter's list), checked against ``model``, or the planned ones."""
    if modules is not None:
        specs = list(modules)
        _check_modules_exist(model, specs)
        return specs
    specs = plan_specs(model, config, saved)
    if not specs:
        raise InvalidArgumentError(
            f"target_modules={config.target_modules!r} matches no nn.Linear / Conv1D "
            "layer of the model"
        )
    return specs


def _check_vector_length(config: UniLoRAConfig, specs: Sequence[ModuleSpec]) -> int:
    """``D`` of ``specs``, after checking ``d <= D``."""
    total = lora_size(specs, config.rank)
    if config.vector_length > total:
        raise InvalidArgumentError(
            f"vector_length d = {config.vector_length} is larger than D = {total}, the "
            f"number of LoRA parameters of the {len(specs)} adapted modules at rank "
            f"{config.rank}; choose d <= D, e.g. d = {_suggest_d(total)}"
        )
    return total


# ---------------------------------------------------------------------------- wrapping


def _wrap_at(model: nn.Module, name: str, kind: type[_W], context: AdapterContext) -> _W:
    """The ``kind`` wrapper (layer or modules_to_save) at ``name``, made if missing."""
    parent, child = parent_of(model, name)
    current = parent._modules[child]
    if isinstance(current, kind):
        return current
    wrapper = kind(current, context)  # type: ignore[arg-type]
    setattr(parent, child, wrapper)
    return wrapper


def _attach_layers(
    registry: AdapterRegistry, entry: AdapterEntry, specs: Sequence[ModuleSpec]
) -> None:
    """Gives every module of ``specs`` the adapter's branch, ``theta_D`` laid out in
    flattening order: per module ``B`` (``out x r``) then ``A`` (``r x in``)."""
    config, state = entry.config, entry.state
    offset = 0
    for spec in specs:
        layer = _wrap_at(registry.base_model, spec.name, UniLoRALayer, registry.context)
        r = config.rank
        end = offset + r * (spec.in_features + spec.out_features)
        branch = Branch(
            spec=spec,
            rank=r,
            scaling=config.scaling,
            offset_b=offset,
            offset_a=offset + spec.out_features * r,
            end=end,
            slot=2 * len(entry.layers),
            state=state,
        )
        layer.add_branch(entry.name, branch, config.dropout)
        entry.layers.append(layer)
        state.sizes += [spec.out_features * r, r * spec.in_features]
        offset = end


def inject_adapter(
    registry: AdapterRegistry,
    name: str,
    config: UniLoRAConfig,
    *,
    modules: Sequence[ModuleSpec] | None,
    trainable: bool,
    expect_saved: Sequence[str] | None = None,
    source: object = None,
) -> AdapterEntry:
    """Adds adapter ``name`` (not made active): checks it against the model and the other
    adapters, makes its record and ``theta_d``, wraps its layers and modules_to_save.

    ``modules`` is a saved adapter's module list (checked against the model) and
    ``expect_saved`` its modules_to_save (``source`` names it in errors); without them the
    targets are found with ``config``'s rules.
    """
    registry.check_new_name(name)
    model = registry.base_model
    saved = resolve_saved(model, config, expect_saved, source)
    _check_saved_overlap(registry, saved)
    specs = _specs(model, config, saved, modules)
    _check_outside_saved(registry, specs)
    total = _check_vector_length(config, specs)
    projection = make_projection(
        config.projection, config.seed, total, config.vector_length, config.projection_map
    )
    record = adapter_record(
        model, config, specs, saved, projection, targets_given=modules is not None
    )
    registry.new_vector(name, config, trainable=trainable)
    state = ThetaDCache(
        lambda: registry.vector(name), projection, config.index_mode, config.backend
    )
    entry = AdapterEntry(name, config, record, state, saved)
    _attach_layers(registry, entry, specs)
    for s in saved:
        _wrap_at(model, s, ModulesToSaveWrapper, registry.context).add(name, trainable)
    registry.entries[name] = entry
    state.sync_index_map()
    return entry


def delete_adapter(registry: AdapterRegistry, name: str) -> None:
    """Deletes adapter ``name`` (unmerged first if merged); layers and modules_to_save
    that no adapter uses any more get their base module back. Deleting the active adapter
    activates the remaining adapter whose name sorts first, as in PEFT."""
    entry = registry.entry(name)
    if any(name in layer.merged_adapters for layer in entry.layers):
        unmerge(registry, [name])
    model = registry.base_model
    for layer in entry.layers:
        spec = layer.branches[name].spec
        layer.remove_branch(name)
        if not layer.branches:
            parent, child = parent_of(model, spec.name)
            setattr(parent, child, layer.base_layer)
    for s in entry.saved:
        wrapper: ModulesToSaveWrapper = module_at(model, s)  # type: ignore[assignment]
        del wrapper.modules_to_save[name]
        if not len(wrapper.modules_to_save):
            parent, child = parent_of(model, s)
            setattr(parent, child, wrapper.original_module)
    entry.state.clear()
    del registry.entries[name]
    registry.set_vector(name, None)
    if registry.context.active == name:
        registry.context.active = None
        if registry.entries:
            registry.activate(sorted(registry.entries)[0])
