"""Model inputs from examples: tokenize once, then batches padded to their longest row."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...datasets import Example
from ...errors import InvalidArgumentError

__all__ = ["Batch", "batches", "encode"]


@dataclass
class Batch:
    """Padded model inputs plus the labels (class ids, or token ids with -100 on padding)."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    rows: list[int]

    def to(self, device: torch.device | str) -> Batch:
        """The batch on ``device`` (itself when it is there already)."""
        if self.labels.device == torch.device(device):
            return self
        inputs = {k: v.to(device, non_blocking=True) for k, v in self.inputs.items()}
        return Batch(inputs, self.labels.to(device, non_blocking=True), self.rows)


def encode(
    tokenizer: Any, examples: Sequence[Example], max_length: int
) -> list[dict[str, list[int]]]:
    """Tokenizes every text once (truncated to ``max_length`` tokens)."""
    if max_length < 2:
        raise InvalidArgumentError(f"max_length must be at least 2, got {max_length}")
    enc = tokenizer([ex.text for ex in examples], truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return [{k: enc[k][i] for k in keys} for i in range(len(examples))]


def _order(n: int, encoded: Sequence[dict[str, list[int]]], shuffle: bool, seed: int) -> list[int]:
    order = list(range(n))
    if shuffle:
        random.Random(seed).shuffle(order)
    else:
        order.sort(key=lambda i: len(encoded[i]["input_ids"]))
    return order


def batches(
    encoded: Sequence[dict[str, list[int]]],
    examples: Sequence[Example],
    tokenizer: Any,
    batch_size: int,
    task: str,
    *,
    shuffle: bool,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> list[Batch]:
    """Batches of ``batch_size`` rows, each padded to its longest row. Shuffled with
    ``seed`` for training; in evaluation sorted by length (less padding)."""
    order = _order(len(encoded), encoded, shuffle, seed)
    return [
        _pad(encoded, examples, rows, tokenizer.pad_token_id, task, device)
        for rows in (order[i : i + batch_size] for i in range(0, len(order), batch_size))
    ]


def _pad(
    encoded: Sequence[dict[str, list[int]]],
    examples: Sequence[Example],
    rows: list[int],
    pad_id: int,
    task: str,
    device: torch.device | str,
) -> Batch:
    """One batch, right-padded to its longest row. Labels: class ids (classification),
    the rows' own ``labels`` (instruction data, -100 on padding) or the input ids with
    -100 on padding (causal LM)."""
    width = max(len(encoded[i]["input_ids"]) for i in rows)
    inputs: dict[str, torch.Tensor] = {}
    for key in encoded[rows[0]]:
        fill = {"input_ids": pad_id, "labels": -100}.get(key, 0)
        data = [encoded[i][key] + [fill] * (width - len(encoded[i][key])) for i in rows]
        inputs[key] = torch.tensor(data, dtype=torch.long, device=device)
    if task == "classification":
        labels = torch.tensor([examples[i].label for i in rows], dtype=torch.long, device=device)
    elif "labels" in inputs:
        labels = inputs.pop("labels")
    else:
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return Batch(inputs, labels, rows)
