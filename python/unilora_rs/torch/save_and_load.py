"""Adapters to and from their folders (PEFT's ``save_pretrained`` / ``from_pretrained`` /
``load_adapter``), in the single format of docs/SPEC.md through :mod:`unilora_rs.adapter`.

Several adapters are saved in PEFT's layout: ``"default"`` in the folder itself, every
other adapter in a sub-folder named after it. Both ways of loading (a new model with
:meth:`UniLoRAModel.from_pretrained`, one more adapter with ``load_adapter``) read the
folder with :func:`read_adapter` and fill the added adapter with :func:`load_into`.
:class:`SaveLoadMixin` is the model's public side of it (``from_pretrained``, which
makes the model, is the model's own).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..adapter import (
    VECTOR_KEY,
    AdapterConfig,
    load_adapter,
    load_projection_map,
    save_adapter,
)
from ..errors import InvalidArgumentError, MismatchError, VectorError
from .config import UniLoRAConfig
from .hub import push_adapters, resolve_adapter_dir
from .inject import delete_adapter, inject_adapter
from .registry import DEFAULT_ADAPTER, AdapterEntry, AdapterRegistry

__all__ = [
    "SaveLoadMixin",
    "SavedAdapter",
    "checked_targets",
    "full_tensor",
    "load_adapter_into",
    "load_into",
    "read_adapter",
    "save_adapters",
]


# ---------------------------------------------------------------------------- saving


def full_tensor(t: torch.Tensor) -> torch.Tensor:
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


def _saved_tensors(
    registry: AdapterRegistry, name: str, state_dict: dict[str, torch.Tensor] | None
) -> dict[str, np.ndarray]:
    """Adapter ``name``'s modules_to_save tensors under their base state-dict names
    (bfloat16 as float32), from ``state_dict`` when given."""
    extra: dict[str, np.ndarray] = {}
    entry = registry.entry(name)
    for s in entry.saved:
        module = registry.saved_copy(entry, s)
        for pname, p in module.state_dict().items():
            if state_dict is not None:
                p = state_dict[registry.state_key(name, f"{s}.{pname}")]
            t = full_tensor(p).detach().to("cpu")
            if t.dtype == torch.bfloat16:
                t = t.to(torch.float32)
            extra[f"{s}.{pname}"] = t.contiguous().numpy()
    return extra


def save_adapters(
    registry: AdapterRegistry,
    save_directory: str | os.PathLike[str],
    selected_adapters: Sequence[str] | None,
    state_dict: dict[str, torch.Tensor] | None,
    is_main_process: bool,
) -> Path | None:
    """Writes the selected adapters (default: all); see :meth:`UniLoRAModel.save_pretrained`."""
    names = list(registry.entries) if selected_adapters is None else list(selected_adapters)
    if not names:
        raise InvalidArgumentError(
            "no adapter to save: the model has none (every adapter was deleted)"
            if selected_adapters is None
            else "selected_adapters is empty: nothing to save"
        )
    for name in names:
        registry.entry(name)
    root = Path(save_directory)
    for name in names:
        theta_t = (
            state_dict[registry.state_key(name, VECTOR_KEY)]
            if state_dict is not None
            else registry.vector(name)
        )
        theta = full_tensor(theta_t).detach().to("cpu", torch.float32).numpy()
        extra = _saved_tensors(registry, name, state_dict)
        if not is_main_process:
            continue
        if not np.isfinite(theta).all():
            raise VectorError(
                f"adapter {name!r}: theta_d holds NaN or Inf: refusing to save a broken adapter"
            )
        folder = root if name == DEFAULT_ADAPTER else root / name
        entry = registry.entry(name)
        save_adapter(folder, entry.adapter_config, theta, extra, entry.projection.map)
    return root if is_main_process else None


# ---------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class SavedAdapter:
    """An adapter as read from its folder: the record, the training configuration it
    implies (with the runtime options of the load), ``theta_d`` and modules_to_save tensors."""

    directory: Path
    record: AdapterConfig
    config: UniLoRAConfig
    theta: np.ndarray
    extra: dict[str, np.ndarray]


def read_adapter(
    source: str | os.PathLike[str],
    *,
    revision: str | None,
    subfolder: str | None,
    token: str | None,
    cache_dir: str | os.PathLike[str] | None,
    index_mode: str,
    backend: str,
    dropout: float,
) -> SavedAdapter:
    """Reads the adapter at ``source`` (a local folder or a Hub repo id), checked as the
    Rust merge checks it."""
    directory = resolve_adapter_dir(source, revision, subfolder, token, cache_dir)
    record, theta, extra = load_adapter(directory)
    config = UniLoRAConfig.from_adapter_config(
        record,
        index_mode=index_mode,
        backend=backend,
        dropout=dropout,
        projection_map=load_projection_map(directory),
    )
    return SavedAdapter(directory, record, config, theta, extra)


def checked_targets(
    owner: nn.Module, state: dict[str, np.ndarray], source: object
) -> dict[str, torch.Tensor]:
    """The tensors of ``owner`` (by state-dict key) that ``state`` would fill; a missing
    key or another shape raises :class:`MismatchError` naming ``source``, before
    anything is written."""
    own = dict(owner.named_parameters())
    own.update(dict(owner.named_buffers()))
    for key, arr in state.items():
        if key not in own:
            raise MismatchError(f"{source}: saved tensor {key!r} is not in the model")
        if tuple(arr.shape) != tuple(own[key].shape):
            raise MismatchError(
                f"{source}: saved tensor {key!r} has shape {tuple(arr.shape)}, the model "
                f"has {tuple(own[key].shape)}"
            )
    return {key: own[key] for key in state}


def load_into(registry: AdapterRegistry, name: str, saved: SavedAdapter) -> AdapterEntry:
    """Fills adapter ``name`` (just added with ``saved``'s module list) from ``saved``:
    the fingerprint is checked again, then ``theta_d`` and the modules_to_save tensors
    are copied in."""
    entry = registry.entry(name)
    if entry.adapter_config.fingerprint != saved.record.fingerprint:
        raise MismatchError(f"{saved.directory}: fingerprint differs after resolving the modules")
    entry.adapter_config.task = saved.record.task
    with torch.no_grad():
        registry.vector(name).copy_(torch.from_numpy(saved.theta))
    state = {registry.state_key(name, key): arr for key, arr in saved.extra.items()}
    targets = checked_targets(registry.owner, state, saved.directory)
    with torch.no_grad():
        for key, arr in state.items():
            target = targets[key]
            target.copy_(torch.from_numpy(np.ascontiguousarray(arr)).to(target.dtype))
    return entry


def load_adapter_into(
    registry: AdapterRegistry, name: str, saved: SavedAdapter, *, is_trainable: bool
) -> None:
    """Adds ``saved`` as one more adapter ``name`` (not active; deleted again when it
    does not fit). Unless ``is_trainable``, its dropout and copies of modules_to_save
    are put in eval mode."""
    record = saved.record
    inject_adapter(
        registry,
        name,
        saved.config,
        modules=record.modules,
        trainable=False,
        expect_saved=record.modules_to_save,
        source=saved.directory,
    )
    try:
        entry = load_into(registry, name, saved)
    except BaseException:
        delete_adapter(registry, name)
        raise
    if not is_trainable:
        for layer in entry.layers:
            layer.lora_dropout[name].eval()
        for s in entry.saved:
            registry.saved_copy(entry, s).eval()


class SaveLoadMixin:
    """The save / load surface of :class:`~unilora_rs.torch.UniLoRAModel` (PEFT's names)."""

    _registry: AdapterRegistry

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
        return save_adapters(
            self._registry, save_directory, selected_adapters, state_dict, is_main_process
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload Uni-LoRA adapter",
    ) -> str:
        """Saves the adapters to a temporary folder and uploads it with ``huggingface_hub``."""
        return push_adapters(
            repo_id,
            self.save_pretrained,
            private=private,
            token=token,
            commit_message=commit_message,
        )

    def checked_targets(
        self, state: dict[str, np.ndarray], source: object
    ) -> dict[str, torch.Tensor]:
        """The tensors of this model (by state-dict key, see :meth:`state_key`) that
        ``state`` would fill; a missing key or another shape raises
        :class:`MismatchError` naming ``source``, before anything is written."""
        return checked_targets(self._registry.owner, state, source)

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
        saved = read_adapter(
            model_id,
            revision=revision,
            subfolder=subfolder,
            token=token,
            cache_dir=cache_dir,
            index_mode=index_mode,
            backend=backend,
            dropout=dropout,
        )
        load_adapter_into(self._registry, adapter_name, saved, is_trainable=is_trainable)
