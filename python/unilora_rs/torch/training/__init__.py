"""Fine-tuning with Uni-LoRA: the engine of ``unilora train`` and ``unilora demo``.

One module per part, each usable on its own (``examples/compare.py`` trains PEFT's
LoRA, VeRA and Uni-LoRA with exactly the same parts):

* :mod:`.models`: load a local model for a task, size the adapter, the ``task`` record;
* :mod:`.data`: tokenize once, batches padded to their longest row;
* :mod:`.inputs`: a job's examples read, checked, split and batched;
* :mod:`.sft`: instruction data tokenized with answer-only labels, counted truncation;
* :mod:`.loop`: AdamW with warm-up / decay, gradient accumulation, losses, evaluation;
* :mod:`.generation`: greedy answers to held-out prompts, exact match;
* :mod:`.job`: the options (:class:`FinetuneArgs`, also the command-line flags) and
  :func:`finetune`, the whole job;
* :mod:`.hf_trainer`: ``transformers.Trainer`` whose checkpoints are adapter folders
  (imported on request: it needs transformers).
"""

from __future__ import annotations

from .data import Batch, batches, encode
from .generation import exact_match, generate_answers, normalize_answer
from .job import (
    METRICS_NAME,
    SAMPLES_NAME,
    FinetuneArgs,
    FinetuneResult,
    args_dict,
    finetune,
    pick_device,
    resolved,
    summary,
)
from .loop import LoopOptions, batch_loss, evaluate, lm_loss_sum, predict_logits, train_loop
from .models import (
    GLUE_RATIO,
    LLM_RATIO,
    TASKS,
    cache_dir,
    default_vector_length,
    load_task_model,
    lora_parameter_count,
    modules_of,
    packaged_llm_dir,
    pad_was_set,
    quiet_transformers,
    task_record,
)
from .sft import EvalPrompt, encode_sft, eval_prompts, stop_token_ids

__all__ = [
    "GLUE_RATIO",
    "LLM_RATIO",
    "METRICS_NAME",
    "SAMPLES_NAME",
    "TASKS",
    "Batch",
    "EvalPrompt",
    "FinetuneArgs",
    "FinetuneResult",
    "LoopOptions",
    "args_dict",
    "batch_loss",
    "batches",
    "cache_dir",
    "default_vector_length",
    "encode",
    "encode_sft",
    "eval_prompts",
    "evaluate",
    "exact_match",
    "finetune",
    "generate_answers",
    "lm_loss_sum",
    "load_task_model",
    "lora_parameter_count",
    "modules_of",
    "normalize_answer",
    "packaged_llm_dir",
    "pad_was_set",
    "pick_device",
    "predict_logits",
    "quiet_transformers",
    "resolved",
    "stop_token_ids",
    "summary",
    "task_record",
    "train_loop",
]
