"""The options of a fine-tuning job (:class:`FinetuneArgs`), which are also the flags of
``unilora train`` and ``unilora demo`` (no torch here: the command line is built from
them before the training stack loads)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidArgumentError
from .flags import flag

__all__ = ["TASKS", "FinetuneArgs", "parse_targets"]

#: What ``unilora train`` trains.
TASKS = ("classification", "causal-lm")

_REGEX_CHARS = re.compile(r"[\\^$*+?()\[\]{}|]")


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
    """Options of :func:`finetune`; the fields declared with :func:`flag` are also the
    ``unilora train`` (and ``unilora demo``) flags, generated from this declaration."""

    model: Path | None = flag(
        None,
        "local Hugging Face model folder (default: the packaged all-MiniLM-L6-v2)",
        commands=("train",),
        type=Path,
    )
    out: Path | None = flag(
        None, "output folder (default DATA-unilora)", commands=("train",), type=Path
    )
    data: Path | None = flag(
        None,
        "training data (.csv, .tsv, .jsonl)",
        commands=("train",),
        type=Path,
        required=True,
    )
    eval_data: Path | None = flag(
        None, "evaluation data (same columns)", commands=("train",), type=Path
    )
    eval_fraction: float = flag(
        0.1,
        "held-out share of --data when --eval-data is not given",
        commands=("train",),
        type=float,
    )
    task: str = flag("classification", "what to train", commands=("train",), choices=TASKS)
    text_column: str = flag("text", "column of the texts", commands=("train",))
    label_column: str = flag("label", "column of the labels", commands=("train",))
    rank: int = flag(4, "LoRA rank r", type=int)
    vector_length: int | None = flag(
        None,
        "length d of the trained vector (default: the paper's ratio d/D, 5/32 of D for "
        "classification, about 1/19 for causal LM; see docs/TRAINING.md)",
        type=int,
        metavar="D",
    )
    target_modules: list[str] | str | None = flag(
        None,
        "layers to adapt: all-linear, names or suffixes (query,value) or a regex "
        "(default: the model type's query and value projections)",
        convert=parse_targets,
    )
    projection: str = flag(
        "sparse",
        "how theta_d is spread over the LoRA matrices (fastfood is the paper's dense "
        "Walsh-Hadamard variant, see docs/SPEC.md)",
        choices=("sparse", "fastfood"),
    )
    lr: float = flag(2e-2, "learning rate of theta_d", type=float)
    head_lr: float = flag(2e-3, "learning rate of the head", type=float)
    epochs: int = flag(2, "passes over the data", type=int)
    batch_size: int = flag(32, "rows per batch", type=int)
    max_length: int = flag(128, "tokens per text (truncated)", type=int)
    seed: int = flag(0, "data split, initialisation, order", type=int)
    warmup_ratio: float = 0.06
    max_steps: int | None = flag(None, "stop after this many steps", type=int)
    max_train_examples: int | None = None
    threads: int | None = flag(None, "torch CPU threads", type=int)
    progress: bool = flag(True, "no progress bar", negative="--no-progress")
    overwrite: bool = flag(False, "replace an earlier run in --out", commands=("train",))
