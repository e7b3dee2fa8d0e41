"""TRL's ``SFTTrainer`` for a :class:`~unilora_rs.torch.UniLoRAModel` (needs ``trl``).

``UniLoRASFTTrainer`` is :class:`~unilora_rs.torch.training.hf_trainer.UniLoRATrainerMixin`
(checkpoints are adapter folders, resume restores them) before ``trl.SFTTrainer``, with
two corrections where TRL assumes a ``PreTrainedModel`` or a PEFT model:

* the fused LM head TRL computes its loss with is put on the Hugging Face model inside
  the wrapper (as TRL does for a PEFT model), not on the wrapper: patched onto the
  wrapper, TRL would take the whole causal LM for the backbone and fail at the first
  step (``'CausalLMOutputWithPast' object has no attribute 'last_hidden_state'``);
* the dataset columns are TRL's own, so that packing and padding-free batches keep
  their ``seq_lengths`` (document boundaries); the mixin's rule (the base model's
  ``forward`` parameters) would drop them and documents would attend to each other.

What cannot take a Uni-LoRA model, refused with a message that says so: a model id
instead of a model (Uni-LoRA wraps a loaded model: call ``get_unilora_model`` first),
``peft_config`` (a second tuner), and a Uni-LoRA layer on the output embedding (the
fused head multiplies by ``lm_head.weight`` directly, so it would never train). Set a
learning rate for ``theta_d`` (about 5e-3 to 2e-2; SFTConfig's default 2e-5 barely
moves it).
"""

from __future__ import annotations

from typing import Any

from ...errors import InvalidArgumentError
from ...extras import require

try:
    import trl
    from trl.trainer.utils import add_fused_lm_head
except ImportError:  # pragma: no cover - exercised only without trl
    require("unilora_rs.torch.training.trl_trainer")  # one line naming the extra
    raise  # installed but broken: the error itself

from ..layers import UniLoRALayer
from .hf_trainer import UniLoRATrainerMixin

__all__ = ["UniLoRASFTTrainer"]

#: The per-token outputs SFTTrainer's loss reads from the fused head.
FUSED_OUTPUTS = ("log_probs", "entropy", "is_top1")


class UniLoRASFTTrainer(UniLoRATrainerMixin, trl.SFTTrainer):
    """``trl.SFTTrainer`` training the ``theta_d`` of a :class:`UniLoRAModel`; checkpoints
    and the final save are adapter folders. Takes SFTTrainer's arguments (``args`` an
    ``SFTConfig``, ``train_dataset`` of prompt/completion, messages or text rows, ...)."""

    def __init__(self, model: Any, *args: Any, peft_config: Any = None, **kwargs: Any) -> None:
        if isinstance(model, str):
            raise InvalidArgumentError(
                "UniLoRASFTTrainer needs the model wrapped by get_unilora_model, not a model "
                "id: load it, then wrap it (Uni-LoRA cannot wrap inside TRL's loading)"
            )
        if peft_config is not None:
            raise InvalidArgumentError(
                "peft_config would put a PEFT tuner on the Uni-LoRA model; configure "
                "Uni-LoRA with get_unilora_model and leave peft_config out"
            )
        super().__init__(model, *args, **kwargs)
        self._move_fused_head()

    def _move_fused_head(self) -> None:
        wrapped = self._unilora_model()
        if wrapped is None or "forward" not in vars(wrapped):
            return
        del wrapped.forward  # TRL's patch on the wrapper; UniLoRAModel.forward is back
        base = wrapped.base_model
        if isinstance(base.get_output_embeddings(), UniLoRALayer):
            raise InvalidArgumentError(
                "SFTTrainer's fused LM head multiplies by lm_head.weight directly, so a "
                "Uni-LoRA layer on the output embedding would never train: leave it out of "
                "target_modules (all-linear does)"
            )
        add_fused_lm_head(base, outputs=FUSED_OUTPUTS)

    def _set_signature_columns_if_needed(self) -> None:
        trl.SFTTrainer._set_signature_columns_if_needed(self)
