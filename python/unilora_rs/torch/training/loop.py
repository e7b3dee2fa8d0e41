"""The training loop and evaluation: AdamW with warm-up / decay, losses, metrics."""

from __future__ import annotations

import functools
import inspect
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ...errors import InvalidArgumentError
from ..model import UniLoRAModel
from .data import Batch

__all__ = [
    "SCHEDULES",
    "LoopOptions",
    "batch_loss",
    "evaluate",
    "label_count",
    "lm_loss_sum",
    "loss_sum",
    "lr_factor",
    "predict_logits",
    "train_loop",
]


def lm_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy and the number of predicted tokens (only the
    positions with a label are turned into float32). ``positions``: the sequence
    positions ``logits`` holds (see :func:`lm_logits`); ``None`` for all of them."""
    if positions is None:
        targets, logits = labels[:, 1:], logits[:, :-1]
    else:
        targets = labels[:, positions + 1]
    keep = targets != -100
    loss = nn.functional.cross_entropy(logits[keep].float(), targets[keep], reduction="sum")
    return loss, int(keep.sum())


@functools.cache
def _forward_takes_logits_to_keep(cls: type) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


def _takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether the causal LM inside ``model`` (a UniLoRAModel or PEFT wrapper) computes
    logits for chosen positions only (transformers' ``logits_to_keep``); the answer is
    kept per model class."""
    while True:
        if isinstance(model, UniLoRAModel):
            model = model.base_model
        elif callable(getattr(model, "get_base_model", None)):
            model = model.get_base_model()
        else:
            return _forward_takes_logits_to_keep(type(model))


def lm_logits(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The logits a next-token loss needs and the positions they are at: with
    answer-only labels only the positions before a labelled token, when the model can
    skip the others (the LM head's matmul and the float32 softmax over the vocabulary
    are about a fifth of a small LLM's forward); else every position and ``None``."""
    positions = (batch.labels[:, 1:] != -100).any(0).nonzero().flatten()
    if len(positions) < batch.labels.shape[1] - 1 and _takes_logits_to_keep(model):
        return model(**batch.inputs, logits_to_keep=positions).logits, positions
    return model(**batch.inputs).logits, None


def lm_batch_loss_sum(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """:func:`lm_loss_sum` of ``model`` on ``batch``, from the logits it needs only."""
    logits, positions = lm_logits(model, batch)
    return lm_loss_sum(logits, batch.labels, positions)


def label_count(batch: Batch, task: str) -> int:
    """What a batch's loss is averaged over: rows (classification) or predicted tokens."""
    if task == "classification":
        return len(batch.rows)
    return int((batch.labels[:, 1:] != -100).sum())


def loss_sum(model: nn.Module, batch: Batch, task: str) -> torch.Tensor:
    """The summed loss of one batch (see :func:`label_count` for the mean's divisor)."""
    if task == "classification":
        logits = model(**batch.inputs).logits
        return nn.functional.cross_entropy(logits.float(), batch.labels, reduction="sum")
    return lm_batch_loss_sum(model, batch)[0]


def batch_loss(model: nn.Module, batch: Batch, task: str) -> torch.Tensor:
    """The mean loss of one batch: cross-entropy over classes, or per predicted token."""
    return loss_sum(model, batch, task) / max(label_count(batch, task), 1)


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


def _classification_metrics(
    model: nn.Module, data: Sequence[Batch], device: torch.device | str | None
) -> dict[str, float]:
    correct = 0
    total = 0.0
    n = 0
    for batch in data:
        batch = batch.to(device) if device is not None else batch
        logits = model(**batch.inputs).logits.float()
        total += float(nn.functional.cross_entropy(logits, batch.labels, reduction="sum"))
        correct += int((logits.argmax(-1) == batch.labels).sum())
        n += len(batch.rows)
    return {"eval_accuracy": correct / max(n, 1), "eval_loss": total / max(n, 1)}


def _lm_metrics(
    model: nn.Module, data: Sequence[Batch], device: torch.device | str | None
) -> dict[str, float]:
    total = 0.0
    count = 0
    for batch in data:
        batch = batch.to(device) if device is not None else batch
        s, c = lm_batch_loss_sum(model, batch)
        total += float(s)
        count += c
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0))}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Sequence[Batch],
    task: str,
    *,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """``{"eval_accuracy", "eval_loss"}`` (classification) or ``{"eval_loss",
    "eval_perplexity"}`` (causal LM and instruction data: mean loss per predicted token,
    on the answer tokens for instruction data); batches are moved to ``device``."""
    was_training = model.training
    model.eval()
    try:
        if task == "classification":
            return _classification_metrics(model, data, device)
        return _lm_metrics(model, data, device)
    finally:
        model.train(was_training)


SCHEDULES = ("linear", "cosine", "constant")


def lr_factor(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """The learning-rate multiplier at each step: a linear warm-up over ``warmup`` steps,
    then a linear or cosine decay to zero at ``total``, or constant."""
    if kind not in SCHEDULES:
        raise InvalidArgumentError(f"lr schedule {kind!r} is not one of {', '.join(SCHEDULES)}")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        done = (step - warmup) / max(1, total - warmup)
        if kind == "constant":
            return 1.0
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))
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

    def record(self, record: dict[str, Any]) -> None:
        if self._bar is None:
            return
        where = f"epoch {record['epoch']}" if record.get("epoch_end") else f"step {record['steps']}"
        parts = [f"{where}: train loss {record['train_loss']:.4f}"]
        for key in ("eval_loss", "eval_accuracy", "eval_perplexity"):
            if key in record:
                parts.append(f"{key} {record[key]:.4f}")
        self._bar.write(", ".join(parts))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@dataclass
class LoopOptions:
    """How :func:`train_loop` steps: optimizer steps of ``grad_accum`` batches each,
    the learning-rate schedule, evaluation every ``eval_steps`` steps (and after every
    epoch), the device batches are moved to."""

    epochs: int = 1
    max_steps: int | None = None
    warmup_ratio: float = 0.06
    schedule: str = "linear"
    grad_accum: int = 1
    eval_steps: int | None = None
    device: torch.device | str | None = None
    progress: bool = True


class _Run:
    """The state of one training run: optimizer, schedule, step count, log records."""

    def __init__(
        self,
        model: nn.Module,
        groups: list[dict[str, Any]],
        task: str,
        opts: LoopOptions,
        total: int,
    ) -> None:
        self.model, self.task, self.opts, self.total = model, task, opts, total
        self.opt = torch.optim.AdamW(groups, weight_decay=0.0)
        warmup = int(opts.warmup_ratio * total)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_factor(opts.schedule, warmup, total)
        )
        self.step = 0
        self.losses: list[float] = []
        self.t0 = time.perf_counter()
        self.history: list[dict[str, Any]] = []

    def optimizer_step(self, group: Sequence[Batch]) -> float:
        """One optimizer step over ``group``: gradients of the summed loss divided by
        the group's label count (so accumulation equals one large batch)."""
        device = self.opts.device
        group = [b.to(device) if device is not None else b for b in group]
        count = max(sum(label_count(b, self.task) for b in group), 1)
        total = 0.0
        for batch in group:
            s = loss_sum(self.model, batch, self.task)
            if not torch.isfinite(s):
                raise InvalidArgumentError(
                    f"the training loss became {s.item()} at step {self.step + 1}; "
                    "lower the learning rate"
                )
            (s / count).backward()
            total += s.item()
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.losses.append(total / count)
        return self.losses[-1]

    def log(self, epoch: int, eval_data: Sequence[Batch] | None, epoch_end: bool) -> dict[str, Any]:
        """A log record: mean train loss since the last record, evaluation metrics."""
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "steps": self.step,
            "train_loss": sum(self.losses) / max(len(self.losses), 1),
            "train_seconds": time.perf_counter() - self.t0,
        }
        if epoch_end:
            record["epoch_end"] = True
        if eval_data is not None:
            record.update(evaluate(self.model, eval_data, self.task, device=self.opts.device))
            if not math.isfinite(record["eval_loss"]):
                raise InvalidArgumentError(
                    f"the held-out loss became {record['eval_loss']} after step {self.step}: "
                    "the trained model gives NaN or Inf; lower the learning rate"
                )
        self.losses, self.t0 = [], time.perf_counter()
        self.history.append(record)
        return record


def _groups(batches: Sequence[Batch], size: int) -> list[Sequence[Batch]]:
    return [batches[i : i + size] for i in range(0, len(batches), size)]


def _total_steps(train_data: Callable[[int], Sequence[Batch]], opts: LoopOptions) -> int:
    if opts.epochs < 1:
        raise InvalidArgumentError(f"epochs must be at least 1, got {opts.epochs}")
    if opts.grad_accum < 1:
        raise InvalidArgumentError(
            f"gradient accumulation steps must be at least 1, got {opts.grad_accum}"
        )
    steps_per_epoch = len(_groups(train_data(0), opts.grad_accum))
    if steps_per_epoch == 0:
        raise InvalidArgumentError("no training batches")
    total = steps_per_epoch * opts.epochs
    return total if opts.max_steps is None else min(total, opts.max_steps)


def train_loop(
    model: nn.Module,
    param_groups: list[dict[str, Any]],
    train_data: Callable[[int], Sequence[Batch]],
    *,
    task: str,
    epochs: int | None = None,
    eval_data: Sequence[Batch] | None = None,
    warmup_ratio: float | None = None,
    max_steps: int | None = None,
    progress: bool | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    options: LoopOptions | None = None,
) -> list[dict[str, Any]]:
    """AdamW over ``param_groups`` (each with its ``lr``); ``train_data(epoch)`` gives the
    batches of an epoch. ``options`` (or the shorthand keywords, which override it) set
    the epochs, schedule, accumulation and evaluation (:class:`LoopOptions`). Returns
    the log records: one after every epoch (``epoch_end``) and one every
    ``eval_steps`` steps, each with the mean train loss since the previous record and
    the evaluation metrics."""
    opts = replace(
        options or LoopOptions(),
        **{
            k: v
            for k, v in {
                "epochs": epochs,
                "warmup_ratio": warmup_ratio,
                "max_steps": max_steps,
                "progress": progress,
            }.items()
            if v is not None
        },
    )
    total = _total_steps(train_data, opts)
    run = _Run(model, param_groups, task, opts, total)
    bar = _Bar(total, opts.progress)
    model.train()
    try:
        for epoch in range(opts.epochs):
            if run.step >= total:
                break
            for group in _groups(train_data(epoch), opts.grad_accum)[: total - run.step]:
                bar.update(run.optimizer_step(group), epoch + 1)
                if opts.eval_steps and run.step % opts.eval_steps == 0 and run.step < total:
                    bar.record(run.log(epoch, eval_data, epoch_end=False))
            record = run.log(epoch, eval_data, epoch_end=True)
            bar.record(record)
            if on_epoch is not None:
                on_epoch(record)
    finally:
        bar.close()
    return run.history
