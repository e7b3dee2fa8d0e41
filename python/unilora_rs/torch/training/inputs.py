"""A job's examples: read, checked for its task and split into training and held-out
sets, then turned into batches (and, for instruction data, held-out prompts)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ...conversations import SftColumns, sft_examples
from ...datasets import (
    LabelMap,
    classification_examples,
    read_records,
    split_examples,
    text_examples,
)
from ...errors import InvalidArgumentError
from ...train_options import FinetuneArgs
from .data import Batch, batches, encode
from .sft import EvalPrompt, encode_sft, eval_prompts

__all__ = ["Examples", "Prepared", "load_examples", "prepare"]

Rows = Sequence[dict[str, Any]]


@dataclass
class Examples:
    """The training and held-out examples (and the label map of a classifier)."""

    train: list[Any]
    held: list[Any]
    labels: LabelMap | None
    source: str
    held_source: str


@dataclass
class Prepared:
    """Batches for the loop: ``train(epoch)`` (shuffled per epoch), held-out batches,
    held-out prompts to generate from (instruction data) and truncation counts."""

    train: Callable[[int], list[Batch]]
    held: list[Batch]
    prompts: list[EvalPrompt] = field(default_factory=list)
    prompts_too_long: int = 0
    truncation: dict[str, dict[str, int]] = field(default_factory=dict)


def _rows(args: FinetuneArgs, train_rows: Rows | None, eval_rows: Rows | None) -> Any:
    if train_rows is None:
        if args.data is None:
            raise InvalidArgumentError("no training data: give --data FILE")
        train_rows, src = read_records(args.data), str(args.data)
    else:
        src = "training data"
    if eval_rows is None and args.eval_data is not None:
        eval_rows, held_src = read_records(args.eval_data), str(args.eval_data)
    else:
        held_src = "evaluation data"
    return train_rows, eval_rows, src, held_src


def _parse(args: FinetuneArgs, rows: Rows, source: str, labels: LabelMap | None) -> Any:
    """``(examples, labels)`` of ``rows`` for the task."""
    if args.task == "classification":
        return classification_examples(
            rows,
            text_column=args.text_column,
            label_column=args.label_column,
            labels=labels,
            source=source,
        )
    if args.task == "sft":
        cols = SftColumns(
            args.prompt_column, args.completion_column, args.messages_column, args.text_column
        )
        return sft_examples(rows, columns=cols, source=source), None
    return text_examples(rows, text_column=args.text_column, source=source), None


def load_examples(args: FinetuneArgs, train_rows: Rows | None, eval_rows: Rows | None) -> Examples:
    """Reads and checks the examples; without evaluation data a seeded share of the
    training data is held out (stratified by class for a classifier)."""
    train_rows, eval_rows, src, held_src = _rows(args, train_rows, eval_rows)
    train, labels = _parse(args, train_rows, src, None)
    if eval_rows is not None:
        held, _ = _parse(args, eval_rows, held_src, labels)
    else:
        stratify = args.task == "classification"
        train, held = split_examples(train, args.eval_fraction, args.seed, stratify=stratify)
    if args.max_train_examples is not None:
        train = train[: args.max_train_examples]
    if not held:
        raise InvalidArgumentError(f"{held_src}: no evaluation examples")
    if labels is not None and len({ex.label for ex in train}) < 2:
        raise InvalidArgumentError(
            "the training split holds a single class; give more data or another split"
        )
    return Examples(train, held, labels, src, held_src)


def _note(message: str) -> None:
    print(f"unilora: note: {message}", file=sys.stderr)


def _report_truncation(name: str, counts: dict[str, int], max_length: int) -> None:
    if counts["cut"] or counts["skipped"]:
        _note(
            f"{name}: {counts['cut']} of {counts['examples']} examples lose answer tokens at "
            f"--max-length {max_length}, {counts['skipped']} keep none and are skipped"
        )


def _prepare_sft(
    args: FinetuneArgs, tokenizer: Any, data: Examples, max_length: int, stops: list[int]
) -> Prepared:
    batch = args.batch_size or 1
    kw = {"stops": stops, "train_on_prompt": args.train_on_prompt}
    train_enc, kept, train_cut = encode_sft(
        tokenizer, data.train, max_length, source=data.source, **kw
    )
    held_enc, held_kept, held_cut = encode_sft(
        tokenizer, data.held, max_length, source=data.held_source, **kw
    )
    train = [data.train[i] for i in kept]
    held = [data.held[i] for i in held_kept]
    prompts, too_long = eval_prompts(tokenizer, data.held[: args.generate_examples], max_length)
    truncation = {"train": train_cut.as_dict(), "eval": held_cut.as_dict()}
    for name, counts in truncation.items():
        _report_truncation(f"{name} data", counts, max_length)
    return Prepared(
        train=lambda epoch: batches(
            train_enc, train, tokenizer, batch, "sft", shuffle=True, seed=args.seed * 1000 + epoch
        ),
        held=batches(held_enc, held, tokenizer, batch, "sft", shuffle=False),
        prompts=prompts,
        prompts_too_long=too_long,
        truncation=truncation,
    )


def prepare(
    args: FinetuneArgs, tokenizer: Any, data: Examples, max_length: int, stops: list[int]
) -> Prepared:
    """Tokenizes once and returns the batch makers for ``args.task``."""
    if args.task == "sft":
        return _prepare_sft(args, tokenizer, data, max_length, stops)
    batch = args.batch_size or 1
    train_enc = encode(tokenizer, data.train, max_length)
    held_enc = encode(tokenizer, data.held, max_length)
    eval_size = max(batch, 64)
    return Prepared(
        train=lambda epoch: batches(
            train_enc,
            data.train,
            tokenizer,
            batch,
            args.task,
            shuffle=True,
            seed=args.seed * 1000 + epoch,
        ),
        held=batches(held_enc, data.held, tokenizer, eval_size, args.task, shuffle=False),
    )
