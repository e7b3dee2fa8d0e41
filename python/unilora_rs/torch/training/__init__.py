"""Fine-tuning with Uni-LoRA: the engine of ``unilora train`` and ``unilora demo``.

One module per part, each usable on its own (``examples/compare.py`` trains PEFT's
LoRA, VeRA and Uni-LoRA with exactly the same parts):

* :mod:`.models`: load a local model for a task, size the adapter, the ``task`` record;
* :mod:`.data`: tokenize once, batches padded to their longest row;
* :mod:`.loop`: AdamW with warm-up / decay, losses, evaluation;
* :mod:`.job`: the options (:class:`FinetuneArgs`, also the command-line flags) and
  :func:`finetune`, the whole job;
* :mod:`.hf_trainer`: ``transformers.Trainer`` whose checkpoints are adapter folders
  (imported on request: it needs transformers).
"""

from __future__ import annotations

from .data import Batch, batches, encode
from .job import METRICS_NAME, FinetuneArgs, FinetuneResult, args_dict, finetune, resolved, summary
from .loop import batch_loss, evaluate, lm_loss_sum, predict_logits, train_loop
from .models import (
    GLUE_RATIO,
    LLM_RATIO,
    TASKS,
    default_vector_length,
    load_task_model,
    lora_parameter_count,
    modules_of,
    pad_was_set,
    quiet_transformers,
    task_record,
)

__all__ = [
    "GLUE_RATIO",
    "LLM_RATIO",
    "METRICS_NAME",
    "TASKS",
    "Batch",
    "FinetuneArgs",
    "FinetuneResult",
    "args_dict",
    "batch_loss",
    "batches",
    "default_vector_length",
    "encode",
    "evaluate",
    "finetune",
    "lm_loss_sum",
    "load_task_model",
    "lora_parameter_count",
    "modules_of",
    "pad_was_set",
    "predict_logits",
    "quiet_transformers",
    "resolved",
    "summary",
    "task_record",
    "train_loop",
]
