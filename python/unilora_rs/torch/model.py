"""``UniLoRAModel``: a torch / transformers model with Uni-LoRA adapters, each one
trainable float32 vector ``theta_d``.

The user surface follows PEFT: :func:`get_unilora_model`, ``print_trainable_parameters``,
``save_pretrained`` / ``from_pretrained`` (local folder or the Hugging Face Hub),
``merge_and_unload``, ``merge_adapter`` / ``unmerge_adapter``, ``disable_adapter()``,
and for several adapters ``add_adapter`` / ``load_adapter`` / ``set_adapter`` /
``delete_adapter`` / ``active_adapter`` and mixed-adapter batches
(``model(..., adapter_names=[...])``, also through ``generate``). Adapters are written
in the single format of docs/SPEC.md through :mod:`unilora_rs.adapter`; several adapters
are saved in PEFT's layout (``"default"`` in the folder itself, every other adapter in a
sub-folder named after it).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..adapter import (
    CONFIG_NAME,
    VECTOR_KEY,
    WEIGHTS_NAME,
    AdapterConfig,
    ModuleSpec,
    load_adapter,
    load_projection_map,
    save_adapter,
)
from ..errors import InvalidArgumentError, MismatchError, VectorError
from .cache import ThetaDCache
from .config import UniLoRAConfig
from .context import BASE_ROWS, AdapterContext
from .layers import Branch, UniLoRALayer
from .modules_to_save import ModulesToSaveWrapper
from .ops import INDEX_MODES, Params, make_projection
from .quant import dequantized_weight, is_quantized
from .targets import (
    find_modules_to_save,
    find_targets,
    module_features,
    module_kind,
    plain_named_modules,
    target_rule,
)

__all__ = ["DEFAULT_ADAPTER", "UniLoRAModel", "get_unilora_model"]

#: The name of the first adapter unless another is given (PEFT's name). Its vector is
#: the model's parameter ``theta_d``; another adapter's is ``theta_d_adapters.<name>``.
DEFAULT_ADAPTER = "default"


_W = TypeVar("_W", UniLoRALayer, ModulesToSaveWrapper)


def _suggest_d(total: int) -> int:
    return max(1, min(total, 2 ** max(0, (total // 10).bit_length() - 1)))


class _Adapter:
    """One adapter of a model, all but its vector (a parameter of the model)."""

    def __init__(
        self,
        name: str,
        config: UniLoRAConfig,
        adapter_config: AdapterConfig,
        state: ThetaDCache,
        saved: list[str],
    ) -> None:
        self.name = name
        self.config = config
        self.adapter_config = adapter_config
        self.state = state
        self.saved = saved
        self.layers: list[UniLoRALayer] = []

    @property
    def projection(self) -> Params:
        """The adapter's projection constants."""
        return self.state.projection


class UniLoRAModel(nn.Module):
    """A base model with Uni-LoRA adapters; the active one trains its float32 ``theta_d``.

    Build it with :func:`get_unilora_model` (new adapter) or
    :meth:`UniLoRAModel.from_pretrained` (saved adapter); add more adapters with
    :meth:`add_adapter` or :meth:`load_adapter`. Attribute lookups that fail here are
    forwarded to the base model (``config``, ``gradient_checkpointing_enable``, ...), as
    in PEFT.
    """

    #: transformers' Trainer refuses to fine-tune a quantized base (bitsandbytes, a GGUF
    #: checkpoint) unless trainable adapters are attached; this flag, which the Trainer
    #: reads from the model it is given, says they are (theta_d is the trainable tensor).
    _hf_peft_config_loaded = True

    def __init__(
        self,
        model: nn.Module,
        config: UniLoRAConfig,
        *,
        modules: Sequence[ModuleSpec] | None = None,
        adapter_name: str = DEFAULT_ADAPTER,
    ) -> None:
        super().__init__()
        if isinstance(model, UniLoRAModel) or any(
            isinstance(m, (UniLoRALayer, ModulesToSaveWrapper)) for m in model.modules()
        ):
            raise InvalidArgumentError("the model already holds Uni-LoRA layers")
        _refuse_peft_model(model)
        self.base_model = model
        self.theta_d_adapters = nn.ParameterDict()
        #: Keep each adapter's ``theta_D`` between passes while gradients are off
        #: (``generate``); rebuilt when ``theta_d`` changes. ``False``: rebuild every pass.
        self.inference_cache = True
        self._context = AdapterContext()
        self._adapters: dict[str, _Adapter] = {}
        for p in model.parameters():
            p.requires_grad_(False)
        self._add(adapter_name, config, modules=modules, trainable=True)
        self._context.active = adapter_name
        self._hook = model.register_forward_pre_hook(self._pre_forward)

    # ------------------------------------------------------------------ adapters

    def _vector(self, name: str) -> nn.Parameter:
        if name == DEFAULT_ADAPTER:
            return self._parameters["theta_d"]  # type: ignore[return-value]
        return self.theta_d_adapters[name]  # type: ignore[return-value]

    def _set_vector(self, name: str, value: nn.Parameter | None) -> None:
        if name == DEFAULT_ADAPTER:
            # Stored under the name "theta_d" (single-adapter state dicts keep their key);
            # the attribute ``theta_d`` is the property below.
            if value is None:
                del self._parameters["theta_d"]
            else:
                self._parameters["theta_d"] = value
        elif value is None:
            del self.theta_d_adapters[name]
        else:
            self.theta_d_adapters[name] = value

    @property
    def theta_d(self) -> nn.Parameter:
        """The active adapter's trainable vector (float32, length ``d``)."""
        return self._vector(self._require_active())

    def get_theta_d(self, adapter_name: str) -> nn.Parameter:
        """Adapter ``adapter_name``'s vector."""
        return self._vector(self._entry(adapter_name).name)

    def _require_active(self) -> str:
        name = self._context.active
        if name is None:
            raise InvalidArgumentError("the model has no adapter (all were deleted)")
        return name

    def _entry(self, name: str) -> _Adapter:
        entry = self._adapters.get(name)
        if entry is None:
            raise InvalidArgumentError(
                f"no adapter named {name!r}; adapters: {', '.join(self._adapters) or 'none'}"
            )
        return entry

    @property
    def active_adapter(self) -> str:
        """The name of the active adapter (PEFT's name)."""
        return self._require_active()

    @property
    def active_adapters(self) -> list[str]:
        """The active adapters as a list (one at most, as PEFT's ``active_adapters``)."""
        return [] if self._context.active is None else [self._context.active]

    @property
    def unilora_configs(self) -> dict[str, UniLoRAConfig]:
        """``name -> UniLoRAConfig`` of every adapter, in the order added (PEFT's
        ``peft_config``)."""
        return {name: e.config for name, e in self._adapters.items()}

    @property
    def _active_entry(self) -> _Adapter:
        return self._entry(self._require_active())

    @property
    def unilora_config(self) -> UniLoRAConfig:
        """The active adapter's configuration."""
        return self._active_entry.config

    @property
    def adapter_config(self) -> AdapterConfig:
        """The active adapter's ``adapter_config.json`` contents."""
        return self._active_entry.adapter_config

    @property
    def projection(self) -> Params:
        """The active adapter's projection constants."""
        return self._active_entry.projection

    @property
    def saved_module_names(self) -> list[str]:
        """The active adapter's ``modules_to_save`` (qualified names)."""
        return list(self._active_entry.saved)

    @property
    def index_mode(self) -> str:
        """The active adapter's index mode."""
        return self._active_entry.state.index_mode

    @property
    def backend(self) -> str:
        """The active adapter's kernel backend."""
        return self._active_entry.state.backend

    def add_adapter(
        self,
        adapter_name: str,
        config: UniLoRAConfig,
        *,
        modules: Sequence[ModuleSpec] | None = None,
    ) -> None:
        """Adds a new adapter (its own seed, ``d``, rank, targets and modules_to_save).

        As in PEFT, the new adapter is not made active: call :meth:`set_adapter`.
        A module that one adapter saves in full (``modules_to_save``) cannot be adapted
        by another one (save it in both, or exclude it).
        """
        self._add(adapter_name, config, modules=modules, trainable=False)

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"adapter_name must be a non-empty string, got {name!r}")
        if name == BASE_ROWS:
            raise InvalidArgumentError(f"{BASE_ROWS!r} is reserved for rows of the base model")
        if "." in name or "/" in name or "\\" in name or name.startswith("_"):
            raise InvalidArgumentError(
                f"adapter_name {name!r} must not hold '.', '/' or '\\' nor start with '_' "
                "(it names a parameter and a sub-folder)"
            )
        if name in self._adapters:
            raise InvalidArgumentError(f"an adapter named {name!r} already exists")

    def _add(
        self,
        name: str,
        config: UniLoRAConfig,
        *,
        modules: Sequence[ModuleSpec] | None,
        trainable: bool,
        expect_saved: Sequence[str] | None = None,
        source: object = None,
    ) -> _Adapter:
        self._check_new_name(name)
        model = self.base_model
        plain = dict(plain_named_modules(model))
        saved = find_modules_to_save(model, config)
        if expect_saved is not None and sorted(saved) != sorted(expect_saved):
            raise MismatchError(
                f"{source}: modules_to_save {list(expect_saved)} resolve to {saved} in this model"
            )
        layer_names = {
            layer.branches[e.name].spec.name for e in self._adapters.values() for layer in e.layers
        }
        wrapped = {s for e in self._adapters.values() for s in e.saved}
        for s in saved:
            inside = [n for n in layer_names if n == s or n.startswith(s + ".")]
            if inside:
                raise InvalidArgumentError(
                    f"modules_to_save {s!r} holds layers another adapter adapts ({inside[0]!r}); "
                    "a module is either saved in full or adapted"
                )
            outer = [
                w for w in wrapped if s != w and (s.startswith(w + ".") or w.startswith(s + "."))
            ]
            if outer:
                raise InvalidArgumentError(
                    f"modules_to_save {s!r} overlaps {outer[0]!r}, saved by another adapter; "
                    "save the same module in both"
                )
        if modules is None:
            specs = []
            for mname, module, kind in find_targets(model, config, saved):
                fan_in, fan_out = module_features(module, kind)
                specs.append(ModuleSpec(mname, fan_in, fan_out, kind))
            if not specs:
                raise InvalidArgumentError(
                    f"target_modules={config.target_modules!r} matches no nn.Linear / Conv1D "
                    "layer of the model"
                )
        else:
            specs = list(modules)
            _check_modules_exist(plain, model, specs)
        for spec in specs:
            owner = [w for w in wrapped if spec.name == w or spec.name.startswith(w + ".")]
            if owner:
                raise InvalidArgumentError(
                    f"module {spec.name!r} is inside {owner[0]!r}, which another adapter saves "
                    "in full (modules_to_save); exclude it or save the module in this adapter too"
                )
        total = config.rank * sum(s.in_features + s.out_features for s in specs)
        if config.vector_length > total:
            raise InvalidArgumentError(
                f"vector_length d = {config.vector_length} is larger than D = {total}, the "
                f"number of LoRA parameters of the {len(specs)} adapted modules at rank "
                f"{config.rank}; choose d <= D, e.g. d = {_suggest_d(total)}"
            )
        projection = make_projection(
            config.projection, config.seed, total, config.vector_length, config.projection_map
        )
        adapter_config = AdapterConfig(
            seed=config.seed,
            vector_length=config.vector_length,
            rank=config.rank,
            alpha=float(config.alpha),  # type: ignore[arg-type]
            modules=specs,
            target_modules=target_rule(model, config) if modules is None else config.target_modules,
            exclude_modules=config.exclude_modules,
            modules_to_save=list(saved),
            base_model_name_or_path=config.base_model_name_or_path or _name_or_path(model),
            init_range=config.init_range,
            library_version=__version__,
            projection=projection.kind,
            map_sha256=projection.map_sha256,
        )
        theta = torch.empty(config.vector_length, dtype=torch.float32, device=_model_device(model))
        theta.uniform_(-config.init_range, config.init_range)
        self._set_vector(name, nn.Parameter(theta, requires_grad=trainable))

        state = ThetaDCache(
            lambda: self._vector(name), projection, config.index_mode, config.backend
        )
        entry = _Adapter(name, config, adapter_config, state, saved)
        offset = 0
        for spec in specs:
            layer = self._wrap_at(spec.name, UniLoRALayer)
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
            layer.add_branch(name, branch, config.dropout)
            entry.layers.append(layer)
            state.sizes += [spec.out_features * r, r * spec.in_features]
            offset = end
        for s in saved:
            self._wrap_at(s, ModulesToSaveWrapper).add(name, trainable)
        self._adapters[name] = entry
        state.sync_index_map()
        return entry

    def _parent(self, name: str) -> tuple[nn.Module, str]:
        parent_name, _, child = name.rpartition(".")
        parent = dict(plain_named_modules(self.base_model))[parent_name]
        return parent, child

    def _wrap_at(self, name: str, kind: type[_W]) -> _W:
        """The ``kind`` wrapper (layer or modules_to_save) at ``name``, made if missing."""
        parent, child = self._parent(name)
        current = parent._modules[child]
        if isinstance(current, kind):
            return current
        wrapper = kind(current, self._context)
        setattr(parent, child, wrapper)
        return wrapper

    def _wrapper(self, name: str) -> ModulesToSaveWrapper:
        parent, child = self._parent(name)
        return parent._modules[child]  # type: ignore[return-value]

    def set_adapter(self, adapter_name: str, *, inference_mode: bool = False) -> None:
        """Makes ``adapter_name`` the active adapter. As in PEFT, its ``theta_d`` (and its
        copies of ``modules_to_save``) become trainable unless ``inference_mode``, and
        every other adapter's are frozen."""
        entry = self._entry(adapter_name)
        for other in self._adapters.values():
            self._set_trainable(other, other is entry and not inference_mode)
        self._context.active = adapter_name

    def _set_trainable(self, entry: _Adapter, trainable: bool) -> None:
        self._vector(entry.name).requires_grad_(trainable)
        for s in entry.saved:
            self._wrapper(s).modules_to_save[entry.name].requires_grad_(trainable)

    def delete_adapter(self, adapter_name: str) -> None:
        """Deletes an adapter (unmerged first if merged). Layers and modules_to_save that
        no adapter uses any more get their base module back. Deleting the active adapter
        activates the remaining adapter whose name sorts first, as in PEFT."""
        entry = self._entry(adapter_name)
        if any(adapter_name in layer.merged_adapters for layer in entry.layers):
            self._unmerge([adapter_name])
        for layer in entry.layers:
            spec = layer.branches[adapter_name].spec
            layer.remove_branch(adapter_name)
            if not layer.branches:
                parent, child = self._parent(spec.name)
                setattr(parent, child, layer.base_layer)
        for s in entry.saved:
            wrapper = self._wrapper(s)
            del wrapper.modules_to_save[adapter_name]
            if not len(wrapper.modules_to_save):
                parent, child = self._parent(s)
                setattr(parent, child, wrapper.original_module)
        entry.state.clear()
        del self._adapters[adapter_name]
        self._set_vector(adapter_name, None)
        if self._context.active == adapter_name:
            self._context.active = None
            if self._adapters:
                self.set_adapter(sorted(self._adapters)[0])

    # ------------------------------------------------------------------ internals

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in {"base_model", "_modules", "_parameters", "_buffers"}:
                raise
            return getattr(self.base_model, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "peft_config":  # set by peft.get_peft_model once it has wrapped us
            raise InvalidArgumentError(
                "peft.get_peft_model cannot wrap a UniLoRAModel: PEFT would freeze theta_d "
                "and leave it out of what it saves. Use one tuner per model: call "
                "merge_and_unload() first and give PEFT the plain model (this model now "
                "holds PEFT layers too; rebuild it)"
            )
        super().__setattr__(name, value)

    def _apply(self, fn: Any, recurse: bool = True) -> UniLoRAModel:
        super()._apply(fn, recurse)
        # theta_d stays float32 whatever the base dtype (model.half(), .to(bfloat16)).
        for entry in self._adapters.values():
            vector = self._vector(entry.name)
            if vector.dtype != torch.float32:
                vector.data = vector.data.to(torch.float32)
            entry.state.sync_index_map()
            entry.state.clear()
        return self

    def _rebuild(self, adapter_name: str | None = None) -> torch.Tensor:
        """``theta_D`` of an adapter (default: the active one), through the kernels layer."""
        return self._entry(adapter_name or self._require_active()).state.rebuild()

    def _pre_forward(self, module: nn.Module, args: Any) -> None:
        ctx = self._context
        if ctx.disabled:
            return
        names = ctx.row_adapters if ctx.row_adapters is not None else ctx.active_list()
        for name in dict.fromkeys(names):
            entry = self._adapters.get(name)
            if entry is None or all(name in layer.merged_adapters for layer in entry.layers):
                continue
            entry.state.prepare(self.inference_cache)

    # ------------------------------------------------------------------ forward

    def _check_adapter_names(self, adapter_names: Sequence[str]) -> list[str]:
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
            raise InvalidArgumentError(
                f"adapter_names must be a list of adapter names, one per row, got {adapter_names!r}"
            )
        names = list(adapter_names)
        unknown = sorted({n for n in names if n != BASE_ROWS and n not in self._adapters})
        if unknown:
            raise InvalidArgumentError(
                f"adapter_names: no adapter named {', '.join(map(repr, unknown))}; adapters: "
                f"{', '.join(self._adapters) or 'none'} (and {BASE_ROWS!r} for the base model)"
            )
        if self.training:
            raise InvalidArgumentError(
                "adapter_names (a mixed-adapter batch) is for inference: call model.eval() first"
            )
        if any(layer.merged for e in self._adapters.values() for layer in e.layers):
            raise InvalidArgumentError(
                "adapter_names cannot be used while an adapter is merged: unmerge_adapter() first"
            )
        return names

    def _mixed(
        self, adapter_names: Sequence[str] | None
    ) -> contextlib.AbstractContextManager[None]:
        if adapter_names is None:
            return contextlib.nullcontext()
        return self._context.mixed(self._check_adapter_names(adapter_names))

    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """Runs the base model (each adapter's ``theta_D`` is rebuilt once, by the root's
        pre-hook). ``adapter_names`` (inference only) gives each row of the batch its own
        adapter, or ``"__base__"`` for the base model, as PEFT does for LoRA."""
        with self._mixed(adapter_names):
            return self.base_model(*args, **kwargs)

    def generate(
        self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any
    ) -> Any:
        """The base model's ``generate``; ``adapter_names`` as in :meth:`forward`. With
        gradients off, ``theta_D`` is rebuilt only when ``theta_d`` changed (see
        :attr:`inference_cache`), not per token."""
        with self._mixed(adapter_names):
            return self.base_model.generate(*args, **kwargs)  # type: ignore[operator]

    # ------------------------------------------------------------------ inspection

    def unilora_layers(self, adapter_name: str | None = None) -> Iterator[UniLoRALayer]:
        """The layers an adapter (default: the active one) adapts, in flattening order."""
        if adapter_name is None and self._context.active is None:
            return
        yield from self._entry(adapter_name or self._require_active()).layers

    @property
    def total_size(self) -> int:
        """``D`` of the active adapter: the number of LoRA parameters ``theta_d`` represents."""
        return self.projection.total

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts."""
        trainable = 0
        total = 0
        for p in self.parameters():
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Prints trainable and total parameter counts, as PEFT does."""
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}"
        )

    @torch.no_grad()
    def lora_matrices(
        self, adapter_name: str | None = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``name -> (A, B)`` of every module an adapter (default: the active one) adapts
        (float32 copies, detached)."""
        name = adapter_name or self._require_active()
        theta_big = self._rebuild(name).detach()
        return {
            layer.branches[name].spec.name: tuple(  # type: ignore[misc]
                m.clone() for m in layer.lora_matrices(theta_big, name)
            )
            for layer in self._entry(name).layers
        }

    def set_index_mode(self, mode: str, backend: str | None = None) -> None:
        """Switches every adapter between ``"on_the_fly"`` and ``"cached"`` indices (and
        the backend)."""
        if mode not in INDEX_MODES:
            raise InvalidArgumentError(
                f"index mode {mode!r} is not one of {', '.join(INDEX_MODES)}"
            )
        for entry in self._adapters.values():
            entry.state.set_index_mode(mode, backend)

    # ------------------------------------------------------------------ merging

    def _merge_names(self, adapter_names: Sequence[str] | None) -> list[str]:
        names = list(adapter_names) if adapter_names is not None else self.active_adapters
        for name in names:
            self._entry(name)
        return names

    def merge_adapter(self, adapter_names: Sequence[str] | None = None) -> None:
        """Adds ``delta W`` of the given adapters (default: the active one) into the base
        weights; the LoRA branches are then skipped. A quantized base cannot be merged in
        place: use :meth:`merge_and_unload`, which dequantises."""
        names = self._merge_names(adapter_names)
        for name in names:
            quantized = [
                b.spec.name
                for layer in self._entry(name).layers
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
                theta_big = self._rebuild(name)
                for layer in self._entry(name).layers:
                    layer.merge(theta_big, name)
                self._entry(name).state.clear()

    def _unmerge(self, names: Sequence[str]) -> None:
        with torch.no_grad():
            for name in reversed(list(names)):
                theta_big = self._rebuild(name)
                for layer in self._entry(name).layers:
                    layer.unmerge(theta_big, name)
                self._entry(name).state.clear()

    def _merged_names(self) -> list[str]:
        order: list[str] = []
        for entry in self._adapters.values():
            for layer in entry.layers:
                for name in layer.merged_adapters:
                    if name not in order:
                        order.append(name)
        return order

    def unmerge_adapter(self) -> None:
        """Subtracts every merged ``delta W`` again (exact in float32 up to rounding)."""
        self._unmerge(self._merged_names())

    def _unload(
        self, merge: bool, adapter_names: Sequence[str] | None, dtype: torch.dtype | None
    ) -> nn.Module:
        names = self._merge_names(adapter_names) if merge else []
        out_dtype = dtype or _float_dtype(self.base_model)
        quantized: dict[int, UniLoRALayer] = {}
        for entry in self._adapters.values():
            for layer in entry.layers:
                if is_quantized(layer.base_layer):
                    quantized[id(layer)] = layer
        with torch.no_grad():
            thetas = {name: self._rebuild(name) for name in names}
            for entry in self._adapters.values():
                for layer in entry.layers:
                    if id(layer) in quantized:
                        continue
                    for name in names:
                        layer.merge(thetas[name], name)
            done: set[int] = set()
            for entry in self._adapters.values():
                for layer in entry.layers:
                    if id(layer) in done:
                        continue
                    done.add(id(layer))
                    spec = layer.branches[entry.name].spec
                    parent, child = self._parent(spec.name)
                    if id(layer) in quantized:
                        deltas = [
                            layer.delta_weight(thetas[n], n) for n in names if n in layer.branches
                        ]
                        module = _dequantized_linear(layer.base_layer, deltas, out_dtype)
                        setattr(parent, child, module)
                    else:
                        setattr(parent, child, layer.base_layer)
            for s in {s for e in self._adapters.values() for s in e.saved}:
                wrapper = self._wrapper(s)
                parent, child = self._parent(s)
                setattr(parent, child, wrapper.active_module())
        if merge:
            _dequantize_rest(self.base_model, out_dtype, was_quantized=bool(quantized))
        self._hook.remove()
        for entry in self._adapters.values():
            entry.state.clear()
        return self.base_model

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
        for name in self._merge_names(adapter_names):
            if not torch.isfinite(self._vector(name)).all():
                raise VectorError(f"adapter {name!r}: theta_d holds NaN or Inf")
        return self._unload(merge=True, adapter_names=adapter_names, dtype=dtype)

    def unload(self) -> nn.Module:
        """Removes the Uni-LoRA layers without merging; returns the base model."""
        if self._merged_names():
            raise InvalidArgumentError("unload() on a merged model: call unmerge_adapter() first")
        return self._unload(merge=False, adapter_names=None, dtype=None)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the context the model computes the base model's outputs (the original
        modules_to_save included)."""
        merged = self._merged_names()
        if merged:
            self._unmerge(merged)
        self._context.disabled = True
        try:
            yield
        finally:
            self._context.disabled = False
            if merged:
                self.merge_adapter(merged)

    # ------------------------------------------------------------------ saving / loading

    def state_key(self, adapter_name: str, tensor: str) -> str:
        """The key in this model's state dict of a tensor of ``adapter_name``'s file:
        ``theta_d`` (``"theta_d"`` for ``"default"``, ``"theta_d_adapters.<name>"``
        otherwise) or a modules_to_save tensor (``"<module>.<param>"`` in the file,
        ``"base_model.<module>.modules_to_save.<name>.<param>"`` here)."""
        entry = self._entry(adapter_name)
        if tensor == VECTOR_KEY:
            return (
                "theta_d" if adapter_name == DEFAULT_ADAPTER else f"theta_d_adapters.{adapter_name}"
            )
        for s in entry.saved:
            if tensor.startswith(s + "."):
                return f"base_model.{s}.modules_to_save.{adapter_name}.{tensor[len(s) + 1 :]}"
        raise MismatchError(
            f"saved tensor {tensor!r} belongs to no modules_to_save of adapter {adapter_name!r}"
        )

    def clear_cache(self) -> None:
        """Drops every adapter's kept ``theta_D`` (rebuilt at the next pass)."""
        for entry in self._adapters.values():
            entry.state.clear()

    def _saved_tensors(
        self, name: str, state_dict: dict[str, torch.Tensor] | None
    ) -> dict[str, np.ndarray]:
        extra: dict[str, np.ndarray] = {}
        for s in self._entry(name).saved:
            module = self._wrapper(s).modules_to_save[name]
            for pname, p in module.state_dict().items():
                if state_dict is not None:
                    p = state_dict[self.state_key(name, f"{s}.{pname}")]
                t = _full_tensor(p).detach().to("cpu")
                if t.dtype == torch.bfloat16:
                    t = t.to(torch.float32)
                extra[f"{s}.{pname}"] = t.contiguous().numpy()
        return extra

    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        selected_adapters: Sequence[str] | None = None,
        *,
        state_dict: dict[str, torch.Tensor] | None = None,
        is_main_process: bool = True,
        **_: Any,
    ) -> Path | None:
        """Writes each adapter's ``adapter_config.json`` + ``adapter_model.safetensors``
        (SPEC.md section 3) in PEFT's layout: ``"default"`` in ``save_directory``, every
        other adapter in ``save_directory/<name>``. ``selected_adapters`` (default: all)
        picks which.

        modules_to_save tensors are stored under their base state-dict names; bfloat16
        tensors are stored as float32 (exact) since the format is read with numpy.

        Under FSDP2 or DeepSpeed ZeRO-3 (``theta_d`` sharded) call it on every rank with
        ``is_main_process=(rank == 0)``: the tensors are gathered (a collective) and only
        the main process writes. ``state_dict`` (this model's keys, e.g. a full state dict
        from ``torch.distributed.checkpoint.state_dict.get_model_state_dict``, as
        ``Trainer`` passes it; see :meth:`state_key`) supplies the tensors instead of the
        live parameters.
        """
        names = list(self._adapters) if selected_adapters is None else list(selected_adapters)
        for name in names:
            self._entry(name)
        root = Path(save_directory)
        for name in names:
            theta_t = (
                state_dict[self.state_key(name, VECTOR_KEY)]
                if state_dict is not None
                else self._vector(name)
            )
            theta = _full_tensor(theta_t).detach().to("cpu", torch.float32).numpy()
            extra = self._saved_tensors(name, state_dict)
            if not is_main_process:
                continue
            if not np.isfinite(theta).all():
                raise VectorError(
                    f"adapter {name!r}: theta_d holds NaN or Inf: refusing to save a broken adapter"
                )
            folder = root if name == DEFAULT_ADAPTER else root / name
            entry = self._entry(name)
            save_adapter(folder, entry.adapter_config, theta, extra, entry.projection.map)
        return root if is_main_process else None

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload Uni-LoRA adapter",
    ) -> str:
        """Saves the adapters to a temporary folder and uploads it with ``huggingface_hub``."""
        import tempfile

        import huggingface_hub

        api = huggingface_hub.HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            info = api.upload_folder(
                repo_id=repo_id, folder_path=tmp, commit_message=commit_message
            )
        return str(getattr(info, "commit_url", info))

    def load_adapter(
        self,
        model_id: str | os.PathLike[str],
        adapter_name: str,
        *,
        is_trainable: bool = False,
        revision: str | None = None,
        subfolder: str | None = None,
        token: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        index_mode: str = "on_the_fly",
        backend: str = "auto",
        dropout: float = 0.0,
    ) -> None:
        """Loads a saved adapter (local folder or Hub repo id) as ``adapter_name``, checked
        as :meth:`from_pretrained` checks it. As in PEFT it is not made active and, with
        ``is_trainable=False`` (the default), its copies of modules_to_save and its
        dropout are in eval mode."""
        directory = _resolve_adapter_dir(model_id, revision, subfolder, token, cache_dir)
        adapter_cfg, theta, extra = load_adapter(directory)
        config = UniLoRAConfig.from_adapter_config(
            adapter_cfg,
            index_mode=index_mode,
            backend=backend,
            dropout=dropout,
            projection_map=load_projection_map(directory),
        )
        entry = self._add(
            adapter_name,
            config,
            modules=adapter_cfg.modules,
            trainable=False,
            expect_saved=adapter_cfg.modules_to_save,
            source=directory,
        )
        try:
            if entry.adapter_config.fingerprint != adapter_cfg.fingerprint:
                raise MismatchError(f"{directory}: fingerprint differs after resolving the modules")
            entry.adapter_config.task = adapter_cfg.task
            with torch.no_grad():
                self._vector(adapter_name).copy_(torch.from_numpy(theta))
            self._load_saved_tensors(entry, extra, directory)
        except BaseException:
            self.delete_adapter(adapter_name)
            raise
        if not is_trainable:
            for layer in entry.layers:
                layer.lora_dropout[adapter_name].eval()
            for s in entry.saved:
                self._wrapper(s).modules_to_save[adapter_name].eval()

    def checked_targets(
        self, state: dict[str, np.ndarray], source: object
    ) -> dict[str, torch.Tensor]:
        """The tensors of this model (by state-dict key, see :meth:`state_key`) that
        ``state`` would fill; a missing key or another shape raises
        :class:`MismatchError` naming ``source``, before anything is written."""
        own = dict(self.named_parameters())
        own.update(dict(self.named_buffers()))
        for key, arr in state.items():
            if key not in own:
                raise MismatchError(f"{source}: saved tensor {key!r} is not in the model")
            if tuple(arr.shape) != tuple(own[key].shape):
                raise MismatchError(
                    f"{source}: saved tensor {key!r} has shape {tuple(arr.shape)}, the model "
                    f"has {tuple(own[key].shape)}"
                )
        return {key: own[key] for key in state}

    def _load_saved_tensors(
        self, entry: _Adapter, extra: dict[str, np.ndarray], source: Path
    ) -> None:
        state = {self.state_key(entry.name, name): arr for name, arr in extra.items()}
        targets = self.checked_targets(state, source)
        with torch.no_grad():
            for key, arr in state.items():
                target = targets[key]
                target.copy_(torch.from_numpy(np.ascontiguousarray(arr)).to(target.dtype))

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        adapter: str | os.PathLike[str],
        *,
        adapter_name: str = DEFAULT_ADAPTER,
        is_trainable: bool = False,
        revision: str | None = None,
        subfolder: str | None = None,
        token: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        index_mode: str = "on_the_fly",
        backend: str = "auto",
        dropout: float = 0.0,
    ) -> UniLoRAModel:
        """Loads an adapter from a local folder or a Hub repo id onto ``model``.

        The adapter is checked as the Rust merge checks it (a changed seed, ``d`` or
        module list raises :class:`MismatchError`), the recorded modules must exist in
        ``model`` with the recorded kind and shapes, and ``theta_d`` must be finite.
        With ``is_trainable=False`` (the default) nothing requires grad and the model is
        in eval mode, as with PEFT; with ``is_trainable=True`` the mode is left as is.
        Further adapters of a folder saved with several load with :meth:`load_adapter`
        (``subfolder=name``).
        """
        directory = _resolve_adapter_dir(adapter, revision, subfolder, token, cache_dir)
        adapter_cfg, theta, extra = load_adapter(directory)
        config = UniLoRAConfig.from_adapter_config(
            adapter_cfg,
            index_mode=index_mode,
            backend=backend,
            dropout=dropout,
            projection_map=load_projection_map(directory),
        )
        saved = find_modules_to_save(model, config)
        if sorted(saved) != sorted(adapter_cfg.modules_to_save):
            raise MismatchError(
                f"{directory}: modules_to_save {adapter_cfg.modules_to_save} resolve to "
                f"{saved} in this model"
            )
        wrapped = cls(model, config, modules=adapter_cfg.modules, adapter_name=adapter_name)
        entry = wrapped._entry(adapter_name)
        if entry.adapter_config.fingerprint != adapter_cfg.fingerprint:
            raise MismatchError(f"{directory}: fingerprint differs after resolving the modules")
        entry.adapter_config.task = adapter_cfg.task
        with torch.no_grad():
            wrapped.theta_d.copy_(torch.from_numpy(theta))
        wrapped._load_saved_tensors(entry, extra, directory)
        if not is_trainable:
            for p in wrapped.parameters():
                p.requires_grad_(False)
            wrapped.eval()
        return wrapped


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's float parameters outside quantized layers."""
    for module in model.modules():
        if is_quantized(module):
            continue
        for p in module.parameters(recurse=False):
            if p.is_floating_point():
                return p.dtype
    return torch.float32


def _dequantized_linear(
    base: nn.Module, deltas: Sequence[torch.Tensor], dtype: torch.dtype
) -> nn.Linear:
    """A float ``nn.Linear`` of ``dtype`` with the dequantised weight of ``base`` plus
    each ``delta W`` (added in float32, rounded once)."""
    weight = dequantized_weight(base)
    for delta in deltas:
        weight = weight + delta.to(weight.device)
    out_f, in_f = weight.shape
    bias = getattr(base, "bias", None)
    linear = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=dtype)
    linear.weight.data.copy_(weight.to(dtype))
    if bias is not None:
        linear.bias.data.copy_(bias.detach().to(dtype))
    linear.requires_grad_(False)
    return linear


def _dequantize_rest(model: nn.Module, dtype: torch.dtype, *, was_quantized: bool) -> None:
    """Dequantises the quantized linear layers no adapter touched and removes the
    transformers quantization markers, so that the merged model is a float model."""
    found = was_quantized
    for name, module in list(model.named_modules()):
        if name and isinstance(module, nn.Linear) and is_quantized(module):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, _dequantized_linear(module, [], dtype))
            found = True
    if not found:
        return
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    for attr in ("is_quantized", "is_loaded_in_8bit", "is_loaded_in_4bit"):
        if getattr(model, attr, False):
            setattr(model, attr, False)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "quantization_method", None) is not None:
        model.quantization_method = None


def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded parameter, gathered from every rank (a collective):
    an FSDP2 DTensor or a DeepSpeed ZeRO-3 partitioned parameter; else ``t``."""
    full = getattr(t, "full_tensor", None)
    if callable(full):
        return full()
    if hasattr(t, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([t]):
            return t.detach().clone()
    return t


def _name_or_path(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "_name_or_path", None) or getattr(model, "name_or_path", None)
    return str(name) if name else None


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _refuse_peft_model(model: nn.Module) -> None:
    peft_layers = sorted(
        {type(m).__name__ for m in model.modules() if type(m).__module__.startswith("peft.")}
    )
    if peft_layers or hasattr(model, "peft_config"):
        raise InvalidArgumentError(
            f"the model already holds PEFT layers ({', '.join(peft_layers) or 'a PEFT model'}); "
            "Uni-LoRA does not stack on another tuner: give get_unilora_model the base model, "
            "or merge_and_unload() the PEFT model first"
        )


def _check_modules_exist(
    plain: dict[str, nn.Module], model: nn.Module, specs: Sequence[ModuleSpec]
) -> None:
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


def _resolve_adapter_dir(
    adapter: str | os.PathLike[str],
    revision: str | None,
    subfolder: str | None,
    token: str | None,
    cache_dir: str | os.PathLike[str] | None,
) -> Path:
    path = Path(adapter)
    if subfolder:
        path = path / subfolder
    if path.is_dir():
        return path
    text = str(adapter)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise FileNotFoundError(2, "adapter folder not found", str(path))
    try:
        import huggingface_hub
    except ImportError as err:
        raise ImportError(
            f"{text!r} is not a local folder; loading from the Hub needs huggingface_hub "
            "(pip install 'unilora_rs[hub]')"
        ) from err
    files = {}
    for filename in (CONFIG_NAME, WEIGHTS_NAME):
        files[filename] = huggingface_hub.hf_hub_download(
            repo_id=text,
            filename=filename,
            subfolder=subfolder,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
        )
    folder = Path(files[CONFIG_NAME]).parent
    if Path(files[WEIGHTS_NAME]).parent != folder:
        raise MismatchError(f"hub download of {text!r} put config and weights in different folders")
    return folder


def get_unilora_model(
    model: nn.Module, config: UniLoRAConfig, adapter_name: str = DEFAULT_ADAPTER
) -> UniLoRAModel:
    """Wraps ``model``: adds Uni-LoRA layers to the targets, freezes everything except
    ``theta_d`` (and the adapter's copies of ``modules_to_save``). The model is modified
    in place; ``adapter_name`` names the first adapter (PEFT's ``"default"``)."""
    return UniLoRAModel(model, config, adapter_name=adapter_name)
