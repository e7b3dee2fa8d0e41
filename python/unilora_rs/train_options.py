"""The options of a fine-tuning job (:class:`FinetuneArgs`), which are also the flags of
``unilora train`` and ``unilora demo`` (no torch here: the command line is built from
them before the training stack loads)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import InvalidArgumentError
from .flags import flag

__all__ = ["DEVICES", "SCHEDULES", "TASKS", "TASK_DEFAULTS", "FinetuneArgs", "parse_targets"]

#: What ``unilora train`` trains: a classifier (a new head), next-token prediction on
#: plain text, or instruction tuning (prompt/completion, chat messages or text).
TASKS = ("classification", "causal-lm", "sft")
#: Where training runs.
DEVICES = ("auto", "cpu", "cuda")
#: Learning-rate schedules after the warm-up.
SCHEDULES = ("linear", "cosine", "constant")

#: The defaults that depend on the task (fields left at ``None``). Instruction tuning
#: follows the paper's LLM setting: every linear layer at rank 4, ``d`` from its d / D;
#: its learning rate comes from the sweep in docs/TRAINING.md.
TASK_DEFAULTS: dict[str, dict[str, object]] = {
    "classification": {"lr": 2e-2, "epochs": 2, "batch_size": 32, "max_length": 128},
    "causal-lm": {"lr": 2e-2, "epochs": 2, "batch_size": 32, "max_length": 128},
    "sft": {
        "lr": 2e-2,
        "epochs": 1,
        "batch_size": 8,
        "max_length": 512,
        "target_modules": "all-linear",
    },
}

_REGEX_CHARS = re.compile(r"[\\^$*+?()\[\]{}|]")

_TRAIN = ("train",)


def parse_targets(value: str | None) -> list[str] | str | None:
    """``--target-modules``: ``all-linear``, a comma-separated list of module names or
    suffixes (``query,value``), or a regular expression (full match of the qualified
    module name) when the value holds regex characters."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        raise InvalidArgumentError("--target-modules is empty")
    if value == "all-linear" or _REGEX_CHARS.search(value):
        return value
    names = [v.strip() for v in value.split(",")]
    if not all(names):
        raise InvalidArgumentError(f"--target-modules {value!r} holds an empty name")
    return names


@dataclass
class FinetuneArgs:
    """Options of :func:`~unilora_rs.torch.training.finetune`; the fields declared with
    :func:`~unilora_rs.flags.flag` are also the ``unilora train`` (and ``unilora demo``)
    flags, generated from this declaration. Fields left at ``None`` take the default of
    the task (:data:`TASK_DEFAULTS`) or of the other fields."""

    model: Path | None = flag(
        None,
        "local Hugging Face model folder (default: the packaged all-MiniLM-L6-v2; for sft "
        "the packaged SmolLM2-135M-Instruct)",
        commands=_TRAIN,
        type=Path,
    )
    out: Path | None = flag(
        None, "output folder (default DATA-unilora)", commands=_TRAIN, type=Path
    )
    data: Path | None = flag(
        None,
        "training data: .csv, .tsv / .tab, .jsonl / .ndjson or .json (a list of objects)",
        commands=_TRAIN,
        type=Path,
        required=True,
    )
    eval_data: Path | None = flag(
        None, "evaluation data (same columns)", commands=_TRAIN, type=Path
    )
    eval_fraction: float = flag(
        0.1,
        "held-out share of --data when --eval-data is not given",
        commands=_TRAIN,
        type=float,
    )
    task: str = flag("classification", "what to train", commands=_TRAIN, choices=TASKS)
    text_column: str = flag("text", "column of the texts", commands=_TRAIN)
    label_column: str = flag("label", "column of the labels", commands=_TRAIN)
    prompt_column: str = flag("prompt", "sft: column of the prompts", commands=_TRAIN)
    completion_column: str = flag(
        "completion", "sft: column of the answers to the prompts", commands=_TRAIN
    )
    messages_column: str = flag(
        "messages", "sft: column of the chat messages ({role, content} lists)", commands=_TRAIN
    )
    train_on_prompt: bool = flag(
        False, "sft: train on every token, not only on the answers", commands=_TRAIN
    )
    rank: int = flag(4, "LoRA rank r", type=int)
    vector_length: int | None = flag(
        None,
        "length d of the trained vector (default: the paper's ratio d/D, 5/32 of D for "
        "classification, about 1/19 for causal LM and sft; see docs/TRAINING.md)",
        type=int,
        metavar="D",
    )
    target_modules: list[str] | str | None = flag(
        None,
        "layers to adapt: all-linear, names or suffixes (query,value) or a regex "
        "(default: all-linear for sft, else the model type's query and value projections)",
        convert=parse_targets,
    )
    projection: str = flag(
        "sparse",
        "how theta_d is spread over the LoRA matrices (fastfood is the paper's dense "
        "Walsh-Hadamard variant, see docs/SPEC.md)",
        choices=("sparse", "fastfood"),
    )
    lr: float | None = flag(
        None, "learning rate of theta_d (default 2e-2)", type=float, metavar="LR"
    )
    head_lr: float = flag(2e-3, "learning rate of the head", type=float)
    lr_scheduler: str = flag(
        "linear", "decay after the warm-up", choices=SCHEDULES, commands=_TRAIN
    )
    warmup_ratio: float = flag(
        0.06, "share of the steps that warm the learning rate up", type=float, commands=_TRAIN
    )
    epochs: int | None = flag(
        None, "passes over the data (default 2; sft 1)", type=int, metavar="N"
    )
    batch_size: int | None = flag(None, "rows per batch (default 32; sft 8)", type=int, metavar="N")
    gradient_accumulation_steps: int = flag(
        1, "batches per optimizer step", type=int, commands=_TRAIN
    )
    max_length: int | None = flag(
        None,
        "tokens per example (default 128; sft 512); longer ones are cut, and an sft "
        "example that keeps no answer token is skipped (both counted)",
        type=int,
        metavar="N",
    )
    seed: int = flag(0, "data split, initialisation, order", type=int)
    max_steps: int | None = flag(None, "stop after this many steps", type=int)
    max_train_examples: int | None = None
    eval_steps: int | None = flag(
        None,
        "also evaluate every N steps (always after each epoch)",
        type=int,
        commands=_TRAIN,
        metavar="N",
    )
    generate_examples: int = flag(
        500,
        "sft: held-out prompts judged by greedy generation (exact match when answers "
        "are short; 0: none)",
        type=int,
        commands=_TRAIN,
        metavar="N",
    )
    max_new_tokens: int | None = flag(
        None,
        "sft: longest generated answer (default: the longest reference answer + 4 tokens, "
        "at most 256)",
        type=int,
        commands=_TRAIN,
        metavar="N",
    )
    eval_base: bool = flag(
        False,
        "sft: also judge the base model (adapter off) on the same held-out set",
        commands=_TRAIN,
    )
    device: str = flag(
        "auto", "where to train (auto: cuda when available)", choices=DEVICES, commands=_TRAIN
    )
    bf16: bool = flag(
        False, "load the base model in bfloat16 (theta_d stays float32)", commands=_TRAIN
    )
    gradient_checkpointing: bool = flag(
        False, "recompute activations in the backward pass (less memory)", commands=_TRAIN
    )
    threads: int | None = flag(None, "torch CPU threads", type=int)
    progress: bool = flag(True, "no progress bar", negative="--no-progress")
    overwrite: bool = flag(False, "replace an earlier run in --out", commands=_TRAIN)

    def check(self) -> None:
        """Refuses option values no job can run with (``lr <= 0``, ``epochs < 1``, a seed
        outside ``[0, 2**64)``, ...), before anything is read or written. Fields left
        at ``None`` take their defaults first (:meth:`with_task_defaults`)."""
        args = self.with_task_defaults()
        if args.task not in TASKS:
            raise InvalidArgumentError(f"task {args.task!r} is not one of {', '.join(TASKS)}")
        for name in ("epochs", "batch_size", "rank", "max_length", "gradient_accumulation_steps"):
            v = getattr(args, name)
            if v < 1:
                raise InvalidArgumentError(f"{name.replace('_', '-')} must be at least 1, got {v}")
        for name in ("lr", "head_lr"):
            v = getattr(args, name)
            if not (v > 0 and math.isfinite(v)):
                raise InvalidArgumentError(
                    f"{name.replace('_', '-')} must be a positive number, got {v}"
                )
        if not 0.0 <= args.warmup_ratio < 1.0:
            raise InvalidArgumentError(f"warmup ratio must be in [0, 1), got {args.warmup_ratio}")
        for name in ("max_steps", "eval_steps", "max_new_tokens", "vector_length", "threads"):
            v = getattr(args, name)
            if v is not None and v < 1:
                raise InvalidArgumentError(f"{name.replace('_', '-')} must be at least 1, got {v}")
        if args.generate_examples < 0:
            raise InvalidArgumentError(
                f"generate-examples must be 0 or more, got {args.generate_examples}"
            )
        if not 0 <= args.seed < 2**64:
            raise InvalidArgumentError(
                f"seed must be an integer in [0, 2**64 - 1], got {args.seed}"
            )

    def with_task_defaults(self) -> FinetuneArgs:
        """A copy whose task-dependent fields left at ``None`` hold the task's default."""
        defaults = TASK_DEFAULTS.get(self.task, {})
        fill = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        return replace(self, **fill)  # type: ignore[arg-type]
