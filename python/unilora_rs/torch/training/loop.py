"""The training loop and evaluation: AdamW with warm-up / decay, losses, metrics."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ...errors import InvalidArgumentError
from .data import Batch

__all__ = ["batch_loss", "evaluate", "lm_loss_sum", "predict_logits", "train_loop"]


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy and the number of predicted tokens."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    loss = nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return loss, int((shift_labels != -100).sum())


def batch_loss(model: nn.Module, batch: Batch, task: str) -> torch.Tensor:
    """The mean loss of one batch: cross-entropy over classes, or per predicted token."""
    logits = model(**batch.inputs).logits
    if task == "classification":
        return nn.functional.cross_entropy(logits.float(), batch.labels)
    total, count = lm_loss_sum(logits, batch.labels)
    return total / max(count, 1)


@torch.no_grad()
def predict_logits(model: nn.Module, data: Sequence[Batch]) -> torch.Tensor:
    """Classification logits (float32, rows in the original example order)."""
    was_training = model.training
    model.eval()
    rows: list[int] = []
    parts = []
    try:
        for batch in data:
            parts.append(model(**batch.inputs).logits.float().cpu())
            rows += batch.rows
    finally:
        model.train(was_training)
    logits = torch.cat(parts)
    out = torch.empty_like(logits)
    out[torch.tensor(rows)] = logits
    return out


def _classification_metrics(model: nn.Module, data: Sequence[Batch]) -> dict[str, float]:
    correct = 0
    loss_sum = 0.0
    n = 0
    for batch in data:
        logits = model(**batch.inputs).logits.float()
        loss_sum += float(nn.functional.cross_entropy(logits, batch.labels, reduction="sum"))
        correct += int((logits.argmax(-1) == batch.labels).sum())
        n += len(batch.rows)
    return {"eval_accuracy": correct / max(n, 1), "eval_loss": loss_sum / max(n, 1)}


def _lm_metrics(model: nn.Module, data: Sequence[Batch]) -> dict[str, float]:
    total = 0.0
    count = 0
    for batch in data:
        s, c = lm_loss_sum(model(**batch.inputs).logits, batch.labels)
        total += float(s)
        count += c
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0))}


@torch.no_grad()
def evaluate(model: nn.Module, data: Sequence[Batch], task: str) -> dict[str, float]:
    """``{"eval_accuracy", "eval_loss"}`` (classification) or ``{"eval_loss",
    "eval_perplexity"}`` (causal LM: mean loss per predicted token)."""
    was_training = model.training
    model.eval()
    try:
        if task == "classification":
            return _classification_metrics(model, data)
        return _lm_metrics(model, data)
    finally:
        model.train(was_training)


def _linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


class _Bar:
    """tqdm progress with a running loss, or nothing."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._bar: Any = None
        self._ema: float | None = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # pragma: no cover - tqdm comes with transformers
                return
            self._bar = tqdm(total=total, unit="step", dynamic_ncols=True, leave=False)

    def update(self, loss: float, epoch: int) -> None:
        self._ema = loss if self._ema is None else 0.9 * self._ema + 0.1 * loss
        if self._bar is not None:
            self._bar.set_postfix_str(f"epoch {epoch} loss {self._ema:.4f}", refresh=False)
            self._bar.update(1)

    def epoch_done(self, record: dict[str, Any]) -> None:
        if self._bar is None:
            return
        parts = [f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}"]
        for key in ("eval_loss", "eval_accuracy", "eval_perplexity"):
            if key in record:
                parts.append(f"{key} {record[key]:.4f}")
        self._bar.write(", ".join(parts))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _total_steps(
    train_data: Callable[[int], Sequence[Batch]], epochs: int, max_steps: int | None
) -> int:
    if epochs < 1:
        raise InvalidArgumentError(f"epochs must be at least 1, got {epochs}")
    steps_per_epoch = len(train_data(0))
    if steps_per_epoch == 0:
        raise InvalidArgumentError("no training batches")
    total = steps_per_epoch * epochs
    return total if max_steps is None else min(total, max_steps)


def _step(
    model: nn.Module,
    batch: Batch,
    task: str,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    step: int,
) -> float:
    """One optimizer step on ``batch``; its loss."""
    loss = batch_loss(model, batch, task)
    if not torch.isfinite(loss):
        raise InvalidArgumentError(
            f"the training loss became {float(loss)} at step {step + 1}; lower the learning rate"
        )
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def train_loop(
    model: nn.Module,
    param_groups: list[dict[str, Any]],
    train_data: Callable[[int], Sequence[Batch]],
    *,
    task: str,
    epochs: int,
    eval_data: Sequence[Batch] | None = None,
    warmup_ratio: float = 0.06,
    max_steps: int | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """AdamW over ``param_groups`` (each with its ``lr``) with a linear warm-up over
    ``warmup_ratio`` of the steps and a linear decay to zero; ``train_data(epoch)`` gives
    the batches of an epoch. Evaluates after every epoch; returns one dict per epoch
    (``train_loss`` = mean loss of the epoch, the evaluation metrics, ``seconds``)."""
    total = _total_steps(train_data, epochs, max_steps)
    opt = torch.optim.AdamW(param_groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _linear_schedule(int(warmup_ratio * total), total)
    )
    bar = _Bar(total, progress)
    history: list[dict[str, Any]] = []
    step = 0
    model.train()
    try:
        for epoch in range(epochs):
            if step >= total:
                break
            t0 = time.perf_counter()
            losses: list[float] = []
            for batch in train_data(epoch)[: total - step]:
                losses.append(_step(model, batch, task, opt, sched, step))
                step += 1
                bar.update(losses[-1], epoch + 1)
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "steps": step,
                "train_loss": sum(losses) / max(len(losses), 1),
                "train_seconds": time.perf_counter() - t0,
            }
            if eval_data is not None:
                record.update(evaluate(model, eval_data, task))
            history.append(record)
            bar.epoch_done(record)
            if on_epoch is not None:
                on_epoch(record)
    finally:
        bar.close()
    return history
