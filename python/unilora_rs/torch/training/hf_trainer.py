"""``transformers.Trainer`` support: checkpoints hold the adapter, resume restores it.

``Trainer`` knows ``PreTrainedModel`` and PEFT models only. With a
:class:`~unilora_rs.torch.UniLoRAModel` it would infer no label names and drop every
dataset column (``UniLoRAModel.forward`` takes ``*args, **kwargs``), write the whole
state dict, frozen base included, into every checkpoint, and find nothing it knows
how to resume from. :class:`UniLoRATrainerMixin` fixes these where they arise:

* DDP does not search for unused parameters (every forward uses ``theta_d``);
* label names, kept columns, ``can_return_loss`` and whether the model accepts the
  loss keyword arguments (``num_items_in_batch``) come from the *base* model's
  ``forward``;
* ``save_model`` (final saves and every checkpoint) writes the adapter folder
  (``adapter_config.json`` + ``adapter_model.safetensors``: ``theta_d`` and any
  ``modules_to_save``), gathered from every rank under FSDP2;
* resuming (``trainer.train(resume_from_checkpoint=...)``) and
  ``load_best_model_at_end`` read that folder back with :func:`restore_adapter`:
  the fingerprint (seed, ``d``, module list and shapes) is recomputed and must equal
  the model's, then ``theta_d`` and the saved modules are copied in. ``Trainer``
  itself restores the optimizer, the scheduler, the RNG states and the data position.

Use :class:`UniLoRATrainer` directly, or put the mixin before another ``Trainer``
subclass (``class MyTrainer(UniLoRATrainerMixin, SFTTrainer)``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...adapter import CONFIG_NAME, VECTOR_KEY, WEIGHTS_NAME, load_adapter
from ...errors import MismatchError
from ...extras import require
from ..model import UniLoRAModel

try:
    import accelerate  # noqa: F401  (transformers.Trainer needs it)
    import transformers
    from transformers.utils.generic import can_return_loss, find_labels
except ImportError:  # pragma: no cover - exercised only without transformers
    require("unilora_rs.torch.training.hf_trainer")  # one line naming the extra
    raise  # installed but broken: the error itself

__all__ = ["UniLoRATrainer", "UniLoRATrainerMixin", "restore_adapter"]

TRAINING_ARGS_NAME = "training_args.bin"


def _as_unilora(model: Any) -> UniLoRAModel | None:
    """The UniLoRAModel inside DDP / ``torch.compile`` wrappers (FSDP2 shards in place)."""
    seen = 0
    while model is not None and seen < 8:
        if isinstance(model, UniLoRAModel):
            return model
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        seen += 1
    return None


def restore_adapter(model: nn.Module, directory: str | os.PathLike[str]) -> None:
    """Loads ``theta_d`` and the ``modules_to_save`` tensors of an adapter folder into the
    active adapter of a (possibly wrapped or FSDP2-sharded) :class:`UniLoRAModel`, in
    place.

    The folder's fingerprint is verified on load and must equal the model's: a changed
    seed, ``d`` or module list raises :class:`~unilora_rs.MismatchError` and loads
    nothing. Under FSDP2 call it on every rank (each rank keeps its shard).
    """
    wrapped = _as_unilora(model)
    if wrapped is None:
        raise MismatchError(f"{type(model).__name__} holds no UniLoRAModel to restore into")
    directory = Path(directory)
    cfg, theta, extra = load_adapter(directory)
    if cfg.fingerprint != wrapped.adapter_config.fingerprint:
        raise MismatchError(
            f"{directory}: adapter fingerprint {cfg.fingerprint} differs from the model's "
            f"{wrapped.adapter_config.fingerprint} (seed, d or the module list changed)"
        )
    active = wrapped.active_adapter
    state: dict[str, np.ndarray] = {wrapped.state_key(active, VECTOR_KEY): theta}
    state.update({wrapped.state_key(active, name): arr for name, arr in extra.items()})
    own = wrapped.checked_targets(state, directory)
    with torch.no_grad():
        for key, arr in state.items():
            target = own[key]
            value = torch.from_numpy(np.ascontiguousarray(arr)).to(target.dtype)
            mesh = getattr(target, "device_mesh", None)
            if mesh is not None:  # an FSDP2 DTensor: keep this rank's shard
                from torch.distributed.tensor import distribute_tensor

                # Every rank read the same file: cut locally, no communication.
                value = distribute_tensor(
                    value.to(target.device), mesh, target.placements, src_data_rank=None
                )
                target.to_local().copy_(value.to_local())
            else:
                target.copy_(value.to(target.device))
    wrapped.clear_cache()


class UniLoRATrainerMixin:
    """Mixin for ``transformers.Trainer`` and its subclasses; see the module docstring."""

    args: Any
    model: Any
    accelerator: Any
    label_names: list[str]
    can_return_loss: bool
    model_accepts_loss_kwargs: bool
    _signature_columns: list[str] | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        wrapped = self._unilora_model()
        if wrapped is None:
            return
        base_cls = type(wrapped.base_model)
        if self.args.label_names is None:
            self.label_names = find_labels(base_cls)
        self.can_return_loss = can_return_loss(base_cls)
        if not hasattr(wrapped.base_model, "accepts_loss_kwargs"):
            import inspect

            params = inspect.signature(wrapped.base_model.forward).parameters.values()
            self.model_accepts_loss_kwargs = any(
                p.kind == p.VAR_KEYWORD or p.name == "num_items_in_batch" for p in params
            )

    def _unilora_model(self) -> UniLoRAModel | None:
        return _as_unilora(getattr(self, "model", None))

    def _build_accelerator_args(self, **kwargs: Any) -> dict[str, Any]:
        args = super()._build_accelerator_args(**kwargs)  # type: ignore[misc]
        if self._unilora_model() is not None and self.args.ddp_find_unused_parameters is None:
            # Every forward uses theta_d: DDP need not search the graph for unused
            # parameters (Trainer's default for models it does not know is to search).
            from accelerate.utils import DistributedDataParallelKwargs

            for handler in args.get("kwargs_handlers", []):
                if isinstance(handler, DistributedDataParallelKwargs):
                    handler.find_unused_parameters = False
        return args

    def _set_signature_columns_if_needed(self) -> None:
        wrapped = self._unilora_model()
        if wrapped is None or self._signature_columns is not None:
            super()._set_signature_columns_if_needed()  # type: ignore[misc]
            return
        import inspect

        columns = list(inspect.signature(wrapped.base_model.forward).parameters)
        self._signature_columns = columns + sorted({"label", "label_ids", *self.label_names})

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Writes the adapter folder (not the base model) to ``output_dir``; under FSDP2
        every rank joins the gather and the main process writes."""
        wrapped = self._unilora_model()
        if wrapped is None:
            super().save_model(output_dir, _internal_call)  # type: ignore[misc]
            return
        out = output_dir if output_dir is not None else self.args.output_dir
        wrapped.save_pretrained(out, is_main_process=self.args.should_save)
        if self.args.should_save:
            processing = getattr(self, "processing_class", None)
            if processing is not None and hasattr(processing, "save_pretrained"):
                processing.save_pretrained(out)
            torch.save(self.args, os.path.join(out, TRAINING_ARGS_NAME))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save")  # type: ignore[attr-defined]

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: nn.Module | None = None
    ) -> None:
        if self._unilora_model() is None:
            super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
            return
        folder = Path(resume_from_checkpoint)
        if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
            raise ValueError(
                f"{folder} holds no Uni-LoRA adapter ({CONFIG_NAME} + {WEIGHTS_NAME}): "
                "not a checkpoint written by UniLoRATrainer"
            )
        restore_adapter(model if model is not None else self.model, folder)

    def _load_best_model(self) -> None:
        if self._unilora_model() is None:
            super()._load_best_model()  # type: ignore[misc]
            return
        best = self.state.best_model_checkpoint  # type: ignore[attr-defined]
        restore_adapter(self.model, best)


class UniLoRATrainer(UniLoRATrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` whose checkpoints are Uni-LoRA adapter folders.

    Nothing else changes: pass a :class:`UniLoRAModel` and the usual arguments;
    ``remove_unused_columns`` and ``label_names`` work with their defaults.
    """
