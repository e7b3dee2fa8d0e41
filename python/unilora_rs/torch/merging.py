"""Adapters in and out of the base weights (PEFT's ``merge_adapter`` / ``unmerge_adapter`` /
``merge_and_unload`` / ``unload`` / ``disable_adapter``).

Merging adds ``delta W = (alpha / r) B A`` of an adapter to each adapted weight, in
float32, rounded once. A quantized base cannot take ``delta W`` in place; unloading with
a merge dequantises it instead (:mod:`unilora_rs.torch.quant`). :class:`MergingMixin`
is the model's public side of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import InvalidArgumentError, VectorError
from .quant import dequantize_rest, dequantized_linear, float_dtype, is_quantized
from .registry import AdapterRegistry
from .targets import module_at, parent_of

__all__ = [
    "MergingMixin",
    "disabled",
    "merge",
    "merge_and_unload",
    "merged_names",
    "unload",
    "unmerge",
]


def merge(registry: AdapterRegistry, adapter_names: Sequence[str] | None) -> None:
    """Adds ``delta W`` of the given adapters (default: the active one) into the base
    weights; an error, before anything changes, when one of them adapts a quantized layer."""
    names = registry.select(adapter_names)
    for name in names:
        quantized = [
            b.spec.name
            for layer in registry.entry(name).layers
            for b in [layer.branches[name]]
            if is_quantized(layer.base_layer)
        ]
        if quantized:
            raise InvalidArgumentError(
                f"merge_adapter on the quantized layer {quantized[0]!r} would round delta W "
                "into the quantized weight; merge_and_unload(dtype=...) dequantises instead"
            )
    with torch.no_grad():
        for name in names:
            entry = registry.entry(name)
            theta_big = entry.state.rebuild()
            for layer in entry.layers:
                layer.merge(theta_big, name)
            entry.state.clear()


def unmerge(registry: AdapterRegistry, names: Sequence[str]) -> None:
    """Subtracts ``delta W`` of ``names`` again, the last merged first."""
    with torch.no_grad():
        for name in reversed(list(names)):
            entry = registry.entry(name)
            theta_big = entry.state.rebuild()
            for layer in entry.layers:
                layer.unmerge(theta_big, name)
            entry.state.clear()


def merged_names(registry: AdapterRegistry) -> list[str]:
    """The merged adapters, in the order their layers record them."""
    order: list[str] = []
    for entry in registry.entries.values():
        for layer in entry.layers:
            for name in layer.merged_adapters:
                if name not in order:
                    order.append(name)
    return order


@contextlib.contextmanager
def disabled(registry: AdapterRegistry) -> Iterator[None]:
    """Within the context the model computes the base model's outputs (merged adapters
    are unmerged for the time and merged again after)."""
    merged = merged_names(registry)
    if merged:
        unmerge(registry, merged)
    registry.context.disabled = True
    try:
        yield
    finally:
        registry.context.disabled = False
        if merged:
            merge(registry, merged)


def merge_and_unload(
    registry: AdapterRegistry,
    hook: RemovableHandle,
    adapter_names: Sequence[str] | None,
    dtype: torch.dtype | None,
) -> nn.Module:
    """:func:`unload` with the given adapters (default: the active one) merged, after
    checking that their ``theta_d`` are finite."""
    for name in registry.select(adapter_names):
        if not torch.isfinite(registry.vector(name)).all():
            raise VectorError(f"adapter {name!r}: theta_d holds NaN or Inf")
    return unload(registry, hook, merge=True, adapter_names=adapter_names, dtype=dtype)


def unload(
    registry: AdapterRegistry,
    hook: RemovableHandle,
    *,
    merge: bool,
    adapter_names: Sequence[str] | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Puts the base modules back (``merge``: with ``delta W`` of the given adapters
    added, quantized layers dequantised to ``dtype``), removes the model's pre-hook
    ``hook`` and returns the base model; modules_to_save become the active adapter's
    copies (PEFT's rule)."""
    if not merge and merged_names(registry):
        raise InvalidArgumentError("unload() on a merged model: call unmerge_adapter() first")
    names = registry.select(adapter_names) if merge else []
    model = registry.base_model
    out_dtype = dtype or float_dtype(model)
    quantized = {
        id(layer)
        for entry in registry.entries.values()
        for layer in entry.layers
        if is_quantized(layer.base_layer)
    }
    with torch.no_grad():
        thetas = {name: registry.entry(name).state.rebuild() for name in names}
        for entry in registry.entries.values():
            for layer in entry.layers:
                if id(layer) not in quantized:
                    for name in names:
                        layer.merge(thetas[name], name)
        _restore_layers(registry, names, thetas, quantized, out_dtype)
        _restore_saved(registry)
    if merge:
        dequantize_rest(model, out_dtype, was_quantized=bool(quantized))
    hook.remove()
    for entry in registry.entries.values():
        entry.state.clear()
    return model


def _restore_layers(
    registry: AdapterRegistry,
    names: Sequence[str],
    thetas: dict[str, torch.Tensor],
    quantized: set[int],
    dtype: torch.dtype,
) -> None:
    """Every adapted layer's base module back in its place (a quantized one as a float
    ``nn.Linear`` of ``dtype`` holding the merged adapters' ``delta W``)."""
    done: set[int] = set()
    for entry in registry.entries.values():
        for layer in entry.layers:
            if id(layer) in done:
                continue
            done.add(id(layer))
            spec = layer.branches[entry.name].spec
            parent, child = parent_of(registry.base_model, spec.name)
            if id(layer) in quantized:
                deltas = [layer.delta_weight(thetas[n], n) for n in names if n in layer.branches]
                setattr(parent, child, dequantized_linear(layer.base_layer, deltas, dtype))
            else:
                setattr(parent, child, layer.base_layer)


def _restore_saved(registry: AdapterRegistry) -> None:
    """Every modules_to_save wrapper replaced by the module the active adapter runs."""
    model = registry.base_model
    for s in {s for e in registry.entries.values() for s in e.saved}:
        wrapper = module_at(model, s)
        parent, child = parent_of(model, s)
        setattr(parent, child, wrapper.active_module())  # type: ignore[operator]


class MergingMixin:
    """The merge / unload surface of :class:`~unilora_rs.torch.UniLoRAModel` (PEFT's names)."""

    _registry: AdapterRegistry
    _hook: RemovableHandle

    def merge_adapter(self, adapter_names: Sequence[str] | None = None) -> None:
        """Adds ``delta W`` of the given adapters (default: the active one) into the base
        weights; the LoRA branches are then skipped. A quantized base cannot be merged in
        place: use :meth:`merge_and_unload`, which dequantises."""
        merge(self._registry, adapter_names)

    def unmerge_adapter(self) -> None:
        """Subtracts every merged ``delta W`` again (exact in float32 up to rounding)."""
        unmerge(self._registry, merged_names(self._registry))

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Sequence[str] | None = None,
        *,
        dtype: torch.dtype | None = None,
    ) -> nn.Module:
        """Merges adapters (default: the active one) into the base weights and returns the
        plain base model; modules_to_save become the active adapter's copies (PEFT's rule).

        On a quantized base (bitsandbytes 8-bit / 4-bit, torchao) every quantized linear
        layer is dequantised to float32, the adapted ones get ``delta W`` added, and each
        becomes a plain ``nn.Linear`` of ``dtype`` (default: the dtype of the model's float
        parameters); the transformers quantization markers are removed, so the result
        saves as an ordinary float checkpoint. ``progressbar`` and ``safe_merge`` are
        accepted for PEFT compatibility (the merge is checked for finite values anyway).
        """
        return merge_and_unload(self._registry, self._hook, adapter_names, dtype)

    def unload(self) -> nn.Module:
        """Removes the Uni-LoRA layers without merging; returns the base model."""
        return unload(self._registry, self._hook, merge=False)

    def disable_adapter(self) -> contextlib.AbstractContextManager[None]:
        """Within the context the model computes the base model's outputs (the original
        modules_to_save included)."""
        return disabled(self._registry)
