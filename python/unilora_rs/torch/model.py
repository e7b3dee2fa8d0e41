"""``UniLoRAModel``: a torch / transformers model with Uni-LoRA adapters, each one
trainable float32 vector ``theta_d``.

The user surface follows PEFT: :func:`get_unilora_model`, ``print_trainable_parameters``,
``save_pretrained`` / ``from_pretrained`` (local folder or the Hugging Face Hub),
``merge_and_unload``, ``merge_adapter`` / ``unmerge_adapter``, ``disable_adapter()``,
and for several adapters ``add_adapter`` / ``load_adapter`` / ``set_adapter`` /
``delete_adapter`` / ``active_adapter`` and mixed-adapter batches
(``model(..., adapter_names=[...])``, also through ``generate``).

The model runs the forward pass and delegates the rest, one responsibility per module:
:mod:`.registry` (the adapters, the active one, their vectors; the accessors of
:class:`~.registry.ActiveAdapterMixin`), :mod:`.inject` (wrapping and unwrapping layers),
:mod:`.cache` (each adapter's ``theta_D``), :mod:`.merging` (:class:`~.merging.MergingMixin`)
and :mod:`.save_and_load` with :mod:`.hub` (:class:`~.save_and_load.SaveLoadMixin`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..adapter import ModuleSpec
from ..errors import InvalidArgumentError
from .config import UniLoRAConfig
from .context import AdapterContext
from .inject import delete_adapter, inject_adapter, refuse_wrapped, resolve_saved
from .layers import UniLoRALayer
from .merging import MergingMixin
from .ops import INDEX_MODES
from .registry import DEFAULT_ADAPTER, ActiveAdapterMixin, AdapterRegistry
from .save_and_load import SaveLoadMixin, load_into, read_adapter

__all__ = ["DEFAULT_ADAPTER", "UniLoRAModel", "get_unilora_model"]


class UniLoRAModel(ActiveAdapterMixin, MergingMixin, SaveLoadMixin, nn.Module):
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
        if isinstance(model, UniLoRAModel):
            raise InvalidArgumentError("the model already holds Uni-LoRA layers")
        refuse_wrapped(model)
        self.base_model = model
        self.theta_d_adapters = nn.ParameterDict()
        #: Keep each adapter's ``theta_D`` between passes while gradients are off
        #: (``generate``); rebuilt when ``theta_d`` changes. ``False``: rebuild every pass.
        self.inference_cache = True
        self._context = AdapterContext()
        self._registry = AdapterRegistry(self, self.theta_d_adapters, model, self._context)
        self._adapters = self._registry.entries
        for p in model.parameters():
            p.requires_grad_(False)
        inject_adapter(self._registry, adapter_name, config, modules=modules, trainable=True)
        self._context.active = adapter_name
        self._hook = model.register_forward_pre_hook(self._pre_forward)

    # ------------------------------------------------------------------ adapters

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
        inject_adapter(self._registry, adapter_name, config, modules=modules, trainable=False)

    def delete_adapter(self, adapter_name: str) -> None:
        """Deletes an adapter (unmerged first if merged). Layers and modules_to_save that
        no adapter uses any more get their base module back. Deleting the active adapter
        activates the remaining adapter whose name sorts first, as in PEFT."""
        delete_adapter(self._registry, adapter_name)

    # ------------------------------------------------------------------ torch.nn.Module

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
            vector = self._registry.vector(entry.name)
            if vector.dtype != torch.float32:
                vector.data = vector.data.to(torch.float32)
            entry.state.sync_index_map()
            entry.state.clear()
        return self

    # ------------------------------------------------------------------ forward

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

    def _rebuild(self, adapter_name: str | None = None) -> torch.Tensor:
        """``theta_D`` of an adapter (default: the active one), through the kernels layer."""
        return self._registry.entry(adapter_name or self._registry.active_name()).state.rebuild()

    def _mixed(
        self, adapter_names: Sequence[str] | None
    ) -> contextlib.AbstractContextManager[None]:
        if adapter_names is None:
            return contextlib.nullcontext()
        names = self._registry.check_row_adapters(adapter_names, training=self.training)
        return self._context.mixed(names)

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
        yield from self._registry.entry(adapter_name or self._registry.active_name()).layers

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

    def lora_matrices(
        self, adapter_name: str | None = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``name -> (A, B)`` of every module an adapter (default: the active one) adapts
        (float32 copies, detached)."""
        return self._registry.entry(adapter_name or self._registry.active_name()).lora_matrices()

    def set_index_mode(self, mode: str, backend: str | None = None) -> None:
        """Switches every adapter between ``"on_the_fly"`` and ``"cached"`` indices (and
        the backend)."""
        if mode not in INDEX_MODES:
            raise InvalidArgumentError(
                f"index mode {mode!r} is not one of {', '.join(INDEX_MODES)}"
            )
        for entry in self._adapters.values():
            entry.state.set_index_mode(mode, backend)

    def clear_cache(self) -> None:
        """Drops every adapter's kept ``theta_D`` (rebuilt at the next pass)."""
        for entry in self._adapters.values():
            entry.state.clear()

    # ------------------------------------------------------------------ loading

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
        saved = read_adapter(
            adapter,
            revision=revision,
            subfolder=subfolder,
            token=token,
            cache_dir=cache_dir,
            index_mode=index_mode,
            backend=backend,
            dropout=dropout,
        )
        resolve_saved(model, saved.config, saved.record.modules_to_save, saved.directory)
        wrapped = cls(model, saved.config, modules=saved.record.modules, adapter_name=adapter_name)
        load_into(wrapped._registry, adapter_name, saved)
        if not is_trainable:
            for p in wrapped.parameters():
                p.requires_grad_(False)
            wrapped.eval()
        return wrapped


def get_unilora_model(
    model: nn.Module, config: UniLoRAConfig, adapter_name: str = DEFAULT_ADAPTER
) -> UniLoRAModel:
    """Wraps ``model``: adds Uni-LoRA layers to the targets, freezes everything except
    ``theta_d`` (and the adapter's copies of ``modules_to_save``). The model is modified
    in place; ``adapter_name`` names the first adapter (PEFT's ``"default"``)."""
    return UniLoRAModel(model, config, adapter_name=adapter_name)
