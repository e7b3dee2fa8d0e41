"""The ``unilora train`` engine (moved to the :mod:`unilora_rs.torch.training` package;
this name stays for existing imports)."""

from __future__ import annotations

from .training import (
    GLUE_RATIO,
    LLM_RATIO,
    METRICS_NAME,
    TASKS,
    Batch,
    FinetuneArgs,
    FinetuneResult,
    args_dict,
    batch_loss,
    batches,
    default_vector_length,
    encode,
    evaluate,
    finetune,
    load_task_model,
    lora_parameter_count,
    modules_of,
    predict_logits,
    task_record,
    train_loop,
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
    "load_task_model",
    "lora_parameter_count",
    "modules_of",
    "predict_logits",
    "task_record",
    "train_loop",
]
