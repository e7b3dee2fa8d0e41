"""The adapters of one model (PEFT's ``peft_config`` / ``active_adapter`` side of a tuner):
each adapter's entry (configuration, ``adapter_config.json`` record, theta_D cache,
layers), which one is active, where each one's ``theta_d`` lives, and the checks on
adapter names; :class:`ActiveAdapterMixin` is the model's public side of it.

Every ``theta_d`` is a parameter of the model itself: ``theta_d`` for ``"default"``,
``theta_d_adapters.<name>`` for any other adapter (the keys of its state dict).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._version import __version__
from ..adapter import VECTOR_KEY, AdapterConfig, ModuleSpec
from ..errors import InvalidArgumentError, MismatchError
from .cache import ThetaDCache
from .config import UniLoRAConfig
from .context import BASE_ROWS, AdapterContext
from .layers import UniLoRALayer
from .modules_to_save import ModulesToSaveWrapper
from .ops import Params
from .targets import module_at, target_rule

__all__ = [
    "DEFAULT_ADAPTER",
    "MAX_NAME_BYTES",
    "ActiveAdapterMixin",
    "AdapterEntry",
    "AdapterRegistry",
    "adapter_record",
]

#: The longest adapter name, in UTF-8 bytes: the name of a sub-folder of
#: ``save_pretrained``, and file names are limited to 255 bytes on Linux and macOS.
MAX_NAME_BYTES = 255

#: The name of the first adapter unless another is given (PEFT's name). Its vector is
#: the model's parameter ``theta_d``; another adapter's is ``theta_d_adapters.<name>``.
DEFAULT_ADAPTER = "default"


class AdapterEntry:
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
        #: The adapter's theta_D cache (:class:`ThetaDCache`).
        self.state = state
        #: Qualified names of its modules_to_save.
        self.saved = saved
        #: The layers it adapts, in flattening order.
        self.layers: list[UniLoRALayer] = []

    @property
    def projection(self) -> Params:
        """The adapter's projection constants."""
        return self.state.projection

    @torch.no_grad()
    def lora_matrices(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``name -> (A, B)`` of every module the adapter adapts (float32 copies, detached)."""
        theta_big = self.state.rebuild().detach()
        return {
            layer.branches[self.name].spec.name: tuple(  # type: ignore[misc]
                m.clone() for m in layer.lora_matrices(theta_big, self.name)
            )
            for layer in self.layers
        }


def adapter_record(
    model: nn.Module,
    config: UniLoRAConfig,
    specs: Sequence[ModuleSpec],
    saved: Sequence[str],
    projection: Params,
    *,
    targets_given: bool,
) -> AdapterConfig:
    """The ``adapter_config.json`` record of a new adapter of ``model`` (``targets_given``:
    the module list came with the adapter, its matching rules are kept as recorded)."""
    return AdapterConfig(
        seed=config.seed,
        vector_length=config.vector_length,
        rank=config.rank,
        alpha=float(config.alpha),  # type: ignore[arg-type]
        modules=list(specs),
        target_modules=config.target_modules if targets_given else target_rule(model, config),
        exclude_modules=config.exclude_modules,
        modules_to_save=list(saved),
        base_model_name_or_path=config.base_model_name_or_path or _name_or_path(model),
        init_range=config.init_range,
        library_version=__version__,
        projection=projection.kind,
        map_sha256=projection.map_sha256,
    )


def _name_or_path(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "_name_or_path", None) or getattr(model, "name_or_path", None)
    return str(name) if name else None


class AdapterRegistry:
    """The adapters of ``owner`` (the model holding their vectors) on ``base_model``, in
    the order added, and the context its layers read the active adapter from."""

    def __init__(
        self,
        owner: nn.Module,
        vectors: nn.ParameterDict,
        base_model: nn.Module,
        context: AdapterContext,
    ) -> None:
        self.owner = owner
        self.base_model = base_model
        self.context = context
        self.entries: dict[str, AdapterEntry] = {}
        self._vectors = vectors

    # ------------------------------------------------------------------ vectors

    def vector(self, name: str) -> nn.Parameter:
        """Adapter ``name``'s ``theta_d``."""
        if name == DEFAULT_ADAPTER:
            return self.owner._parameters["theta_d"]  # type: ignore[return-value]
        return self._vectors[name]  # type: ignore[return-value]

    def set_vector(self, name: str, value: nn.Parameter | None) -> None:
        """Stores (or, with ``None``, removes) adapter ``name``'s ``theta_d``."""
        if name == DEFAULT_ADAPTER:
            # Stored under the name "theta_d" (single-adapter state dicts keep their key);
            # the model's attribute ``theta_d`` is the active adapter's vector.
            if value is None:
                del self.owner._parameters["theta_d"]
            else:
                self.owner._parameters["theta_d"] = value
        elif value is None:
            del self._vectors[name]
        else:
            self._vectors[name] = value

    def new_vector(self, name: str, config: UniLoRAConfig, *, trainable: bool) -> None:
        """A fresh ``theta_d`` for ``name``: float32 ``U(-init_range, init_range)`` on the
        base model's device."""
        theta = torch.empty(config.vector_length, dtype=torch.float32, device=self._device())
        theta.uniform_(-config.init_range, config.init_range)
        self.set_vector(name, nn.Parameter(theta, requires_grad=trainable))

    def _device(self) -> torch.device:
        for p in self.base_model.parameters():
            return p.device
        return torch.device("cpu")

    def state_key(self, name: str, tensor: str) -> str:
        """The key in the owner's state dict of a tensor of adapter ``name``'s file (see
        :meth:`ActiveAdapterMixin.state_key`)."""
        entry = self.entry(name)
        if tensor == VECTOR_KEY:
            return "theta_d" if name == DEFAULT_ADAPTER else f"theta_d_adapters.{name}"
        for s in entry.saved:
            if tensor.startswith(s + "."):
                return f"base_model.{s}.modules_to_save.{name}.{tensor[len(s) + 1 :]}"
        raise MismatchError(
            f"saved tensor {tensor!r} belongs to no modules_to_save of adapter {name!r}"
        )

    # ------------------------------------------------------------------ lookup

    def active_name(self) -> str:
        """The active adapter's name; an error when every adapter was deleted."""
        name = self.context.active
        if name is None:
            raise InvalidArgumentError("the model has no adapter (all were deleted)")
        return name

    def entry(self, name: str) -> AdapterEntry:
        """Adapter ``name``'s entry; an error naming the adapters when there is none."""
        entry = self.entries.get(name)
        if entry is None:
            raise InvalidArgumentError(
                f"no adapter named {name!r}; adapters: {', '.join(self.entries) or 'none'}"
            )
        return entry

    def active_entry(self) -> AdapterEntry:
        """The active adapter's entry."""
        return self.entry(self.active_name())

    def select(self, adapter_names: Sequence[str] | None) -> list[str]:
        """``adapter_names`` checked (default: the active adapter, if any)."""
        names = list(adapter_names) if adapter_names is not None else self.context.active_list()
        for name in names:
            self.entry(name)
        return names

    def saved_copy(self, entry: AdapterEntry, module: str) -> nn.Module:
        """``entry``'s own copy of the modules_to_save module ``module``."""
        wrapper: ModulesToSaveWrapper = module_at(self.base_model, module)  # type: ignore[assignment]
        return wrapper.modules_to_save[entry.name]

    # ------------------------------------------------------------------ activation

    def activate(self, name: str, *, inference_mode: bool = False) -> None:
        """Makes ``name`` active: its ``theta_d`` and copies of modules_to_save trainable
        (unless ``inference_mode``), every other adapter's frozen."""
        entry = self.entry(name)
        for other in self.entries.values():
            self.set_trainable(other, other is entry and not inference_mode)
        self.context.active = name

    def set_trainable(self, entry: AdapterEntry, trainable: bool) -> None:
        """Sets ``requires_grad`` of ``entry``'s vector and copies of modules_to_save."""
        self.vector(entry.name).requires_grad_(trainable)
        for s in entry.saved:
            self.saved_copy(entry, s).requires_grad_(trainable)

    # ------------------------------------------------------------------ name checks

    def check_new_name(self, name: str) -> None:
        """Refuses a name that is empty, reserved, unusable as a parameter or folder
        name (control characters, over :data:`MAX_NAME_BYTES`), or taken: one that
        :meth:`save_pretrained` could not write fails here, not at save."""
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"adapter_name must be a non-empty string, got {name!r}")
        control = next((c for c in name if ord(c) < 0x20 or ord(c) == 0x7F), None)
        if control is not None:
            raise InvalidArgumentError(
                f"adapter_name {name!r} holds the control character {control!r}; adapter "
                "names are free of tabs, line breaks and other control characters (it "
                "names a parameter and a sub-folder)"
            )
        size = len(name.encode("utf-8", "surrogatepass"))
        if size > MAX_NAME_BYTES:
            raise InvalidArgumentError(
                f"adapter_name {name[:24]!r}... is {size} bytes long in UTF-8; at most "
                f"{MAX_NAME_BYTES} (it names a sub-folder, and a file name is limited to that)"
            )
        if name == BASE_ROWS:
            raise InvalidArgumentError(f"{BASE_ROWS!r} is reserved for rows of the base model")
        if "." in name or "/" in name or "\\" in name or name.startswith("_"):
            raise InvalidArgumentError(
                f"adapter_name {name!r} must not hold '.', '/' or '\\' nor start with '_' "
                "(it names a parameter and a sub-folder)"
            )
        if name in self.entries:
            raise InvalidArgumentError(f"an adapter named {name!r} already exists")

    def check_row_adapters(self, adapter_names: Sequence[str], *, training: bool) -> list[str]:
        """The adapter of each batch row (``"__base__"``: the base model), checked for a
        mixed-adapter batch: known names, inference only, no adapter merged."""
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
            raise InvalidArgumentError(
                f"adapter_names must be a list of adapter names, one per row, got {adapter_names!r}"
            )
        names = list(adapter_names)
        unknown = sorted({n for n in names if n != BASE_ROWS and n not in self.entries})
        if unknown:
            raise InvalidArgumentError(
                f"adapter_names: no adapter named {', '.join(map(repr, unknown))}; adapters: "
                f"{', '.join(self.entries) or 'none'} (and {BASE_ROWS!r} for the base model)"
            )
        if training:
            raise InvalidArgumentError(
                "adapter_names (a mixed-adapter batch) is for inference: call model.eval() first"
            )
        if any(layer.merged for e in self.entries.values() for layer in e.layers):
            raise InvalidArgumentError(
                "adapter_names cannot be used while an adapter is merged: unmerge_adapter() first"
            )
        return names


class ActiveAdapterMixin:
    """The adapter accessors of :class:`~unilora_rs.torch.UniLoRAModel` (PEFT's
    ``active_adapter`` / ``peft_config`` / ``set_adapter``): reads of its registry."""

    _registry: AdapterRegistry

    @property
    def theta_d(self) -> nn.Parameter:
        """The active adapter's trainable vector (float32, length ``d``)."""
        return self._registry.vector(self._registry.active_name())

    def get_theta_d(self, adapter_name: str) -> nn.Parameter:
        """Adapter ``adapter_name``'s vector."""
        return self._registry.vector(self._registry.entry(adapter_name).name)

    @property
    def active_adapter(self) -> str:
        """The name of the active adapter (PEFT's name)."""
        return self._registry.active_name()

    @property
    def active_adapters(self) -> list[str]:
        """The active adapters as a list (one at most, as PEFT's ``active_adapters``)."""
        return self._registry.context.active_list()

    @property
    def unilora_configs(self) -> dict[str, UniLoRAConfig]:
        """``name -> UniLoRAConfig`` of every adapter, in the order added (PEFT's
        ``peft_config``)."""
        return {name: e.config for name, e in self._registry.entries.items()}

    @property
    def unilora_config(self) -> UniLoRAConfig:
        """The active adapter's configuration."""
        return self._registry.active_entry().config

    @property
    def adapter_config(self) -> AdapterConfig:
        """The active adapter's ``adapter_config.json`` contents."""
        return self._registry.active_entry().adapter_config

    @property
    def projection(self) -> Params:
        """The active adapter's projection constants."""
        return self._registry.active_entry().projection

    @property
    def total_size(self) -> int:
        """``D`` of the active adapter: the number of LoRA parameters ``theta_d`` represents."""
        return self.projection.total

    @property
    def saved_module_names(self) -> list[str]:
        """The active adapter's ``modules_to_save`` (qualified names)."""
        return list(self._registry.active_entry().saved)

    @property
    def index_mode(self) -> str:
        """The active adapter's index mode."""
        return self._registry.active_entry().state.index_mode

    @property
    def backend(self) -> str:
        """The active adapter's kernel backend."""
        return self._registry.active_entry().state.backend

    def set_adapter(self, adapter_name: str, *, inference_mode: bool = False) -> None:
        """Makes ``adapter_name`` the active adapter. As in PEFT, its ``theta_d`` (and its
        copies of ``modules_to_save``) become trainable unless ``inference_mode``, and
        every other adapter's are frozen."""
        self._registry.activate(adapter_name, inference_mode=inference_mode)

    def state_key(self, adapter_name: str, tensor: str) -> str:
        """The key in this model's state dict of a tensor of ``adapter_name``'s file:
        ``theta_d`` (``"theta_d"`` for ``"default"``, ``"theta_d_adapters.<name>"``
        otherwise) or a modules_to_save tensor (``"<module>.<param>"`` in the file,
        ``"base_model.<module>.modules_to_save.<name>.<param>"`` here)."""
        return self._registry.state_key(adapter_name, tensor)
