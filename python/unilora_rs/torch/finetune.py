"""Fine-tuning a local Hugging Face model with Uni-LoRA: the engine of ``unilora train``.

:func:`finetune` runs the whole job (load, build the adapter, train, evaluate after each
epoch, save the adapter and ``metrics.json``). Its parts are public so that other
tuners can be trained with exactly the same loop (``examples/compare.py`` trains PEFT's
LoRA, VeRA and Uni-LoRA with them):

* :func:`load_task_model` loads the tokenizer and a classification or causal-LM model
  and reports which tensors are new (the classification head);
* :func:`encode` / :func:`batches` tokenize once and pad each batch to its longest row;
* :func:`train_loop` runs AdamW with a linear warm-up / decay schedule;
* :func:`evaluate` gives accuracy and loss (classification) or loss and perplexity.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..datasets import (
    Example,
    LabelMap,
    classification_examples,
    read_records,
    split_examples,
    text_examples,
)
from ..errors import InvalidArgumentError
from .config import UniLoRAConfig
from .model import UniLoRAModel, get_unilora_model

__all__ = [
    "TASKS",
    "Batch",
    "FinetuneArgs",
    "FinetuneResult",
    "batches",
    "default_vector_length",
    "encode",
    "evaluate",
    "finetune",
    "load_task_model",
    "lora_parameter_count",
    "predict_logits",
    "train_loop",
]

TASKS = ("classification", "causal-lm")

#: The paper's d / D for encoders on GLUE: RoBERTa-base, q and v at rank 4
#: (D = 147,456) trained with d = 23,040.
GLUE_RATIO = 23_040 / 147_456
#: The paper's d / D for instruction tuning: Llama-2-7B, all linear layers at rank 4
#: (D = 9,994,240) trained with d = 2^19.
LLM_RATIO = 2**19 / 9_994_240

METRICS_NAME = "metrics.json"


def default_vector_length(total: int, task: str) -> int:
    """``d`` from the paper's ratio ``d / D`` for the task (GLUE for classification,
    instruction tuning for causal LM), at least 1 and at most ``D``."""
    ratio = GLUE_RATIO if task == "classification" else LLM_RATIO
    return max(1, min(total, round(total * ratio)))


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silences transformers' loading chatter (progress bars, "newly initialized" notes)."""
    from transformers.utils import logging as tlog

    level = tlog.get_verbosity()
    bars = tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()


def load_task_model(
    model_dir: str | os.PathLike[str],
    task: str,
    labels: LabelMap | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, Any, list[str]]:
    """``(model, tokenizer, new_tensors)`` for ``task`` from a local model folder.

    ``new_tensors`` are the state-dict names that the checkpoint does not hold and that
    were freshly initialised (for classification, the head). Causal LMs without a
    padding token pad with their end-of-sequence token.
    """
    if task not in TASKS:
        raise InvalidArgumentError(f"task {task!r} is not one of {', '.join(TASKS)}")
    folder = Path(model_dir)
    if not folder.is_dir():
        raise FileNotFoundError(2, "model folder not found", str(folder))
    if not (folder / "config.json").is_file():
        raise InvalidArgumentError(
            f"{folder} is not a Hugging Face model folder (no config.json); give the folder "
            "that save_pretrained wrote"
        )
    import transformers

    with _quiet_transformers():
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                str(folder), local_files_only=True
            )
        except Exception as err:  # transformers raises many types here
            raise InvalidArgumentError(
                f"{folder}: the tokenizer does not load ({type(err).__name__}: {err})"
            ) from err
        kwargs: dict[str, Any] = {"local_files_only": True, "dtype": dtype}
        if task == "classification":
            if labels is None:
                raise InvalidArgumentError("classification needs the label map")
            auto = transformers.AutoModelForSequenceClassification
            kwargs.update(
                num_labels=len(labels),
                id2label=labels.id2label,
                label2id=labels.label2id,
            )
        else:
            auto = transformers.AutoModelForCausalLM
        try:
            model, info = auto.from_pretrained(str(folder), output_loading_info=True, **kwargs)
        except Exception as err:
            raise InvalidArgumentError(
                f"{folder}: the model does not load for {task} ({type(err).__name__}: {err})"
            ) from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise InvalidArgumentError(
                f"{folder}: the tokenizer has neither a pad nor an eos token"
            )
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    new = sorted(info.get("missing_keys", ()))
    return model, tokenizer, new


def modules_of(tensor_names: Sequence[str], model: nn.Module) -> list[str]:
    """The modules that own ``tensor_names`` (``classifier.weight`` -> ``classifier``)."""
    owned = {name: mod for name, mod in model.named_modules()}
    out: list[str] = []
    for t in tensor_names:
        parent = t.rpartition(".")[0]
        if parent in owned and parent not in out:
            out.append(parent)
    return out


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """Padded model inputs plus the labels (class ids, or token ids with -100 on padding)."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    rows: list[int]


def encode(
    tokenizer: Any, examples: Sequence[Example], max_length: int
) -> list[dict[str, list[int]]]:
    """Tokenizes every text once (truncated to ``max_length`` tokens)."""
    if max_length < 2:
        raise InvalidArgumentError(f"max_length must be at least 2, got {max_length}")
    enc = tokenizer([ex.text for ex in examples], truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return [{k: enc[k][i] for k in keys} for i in range(len(examples))]


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
    order = list(range(len(encoded)))
    if shuffle:
        random.Random(seed).shuffle(order)
    else:
        order.sort(key=lambda i: len(encoded[i]["input_ids"]))
    out = []
    pad_id = tokenizer.pad_token_id
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(encoded[i]["input_ids"]) for i in rows)
        inputs: dict[str, torch.Tensor] = {}
        for key in encoded[rows[0]]:
            fill = pad_id if key == "input_ids" else 0
            data = [encoded[i][key] + [fill] * (width - len(encoded[i][key])) for i in rows]
            inputs[key] = torch.tensor(data, dtype=torch.long, device=device)
        if task == "classification":
            labels = torch.tensor(
                [examples[i].label for i in rows], dtype=torch.long, device=device
            )
        else:
            labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        out.append(Batch(inputs, labels, rows))
    return out


# ---------------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------------


def _lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
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


def _loss(model: nn.Module, batch: Batch, task: str) -> torch.Tensor:
    logits = model(**batch.inputs).logits
    if task == "classification":
        return nn.functional.cross_entropy(logits.float(), batch.labels)
    total, count = _lm_loss_sum(logits, batch.labels)
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


@torch.no_grad()
def evaluate(model: nn.Module, data: Sequence[Batch], task: str) -> dict[str, float]:
    """``{"eval_accuracy", "eval_loss"}`` (classification) or ``{"eval_loss",
    "eval_perplexity"}`` (causal LM: mean loss per predicted token)."""
    was_training = model.training
    model.eval()
    try:
        if task == "classification":
            correct = 0
            loss_sum = 0.0
            n = 0
            for batch in data:
                logits = model(**batch.inputs).logits.float()
                loss_sum += float(
                    nn.functional.cross_entropy(logits, batch.labels, reduction="sum")
                )
                correct += int((logits.argmax(-1) == batch.labels).sum())
                n += len(batch.rows)
            return {"eval_accuracy": correct / max(n, 1), "eval_loss": loss_sum / max(n, 1)}
        total = 0.0
        count = 0
        for batch in data:
            s, c = _lm_loss_sum(model(**batch.inputs).logits, batch.labels)
            total += float(s)
            count += c
        loss = total / max(count, 1)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0))}
    finally:
        model.train(was_training)


def _linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


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
    if epochs < 1:
        raise InvalidArgumentError(f"epochs must be at least 1, got {epochs}")
    steps_per_epoch = len(train_data(0))
    if steps_per_epoch == 0:
        raise InvalidArgumentError("no training batches")
    total = steps_per_epoch * epochs
    if max_steps is not None:
        total = min(total, max_steps)
    opt = torch.optim.AdamW(param_groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _linear_schedule(int(warmup_ratio * total), total)
    )
    params = [p for g in param_groups for p in g["params"]]
    bar = _progress(total, progress)
    history: list[dict[str, Any]] = []
    step = 0
    model.train()
    try:
        for epoch in range(epochs):
            if step >= total:
                break
            t0 = time.perf_counter()
            losses = []
            for batch in train_data(epoch):
                if step >= total:
                    break
                loss = _loss(model, batch, task)
                if not torch.isfinite(loss):
                    raise InvalidArgumentError(
                        f"the training loss became {float(loss)} at step {step + 1}; "
                        "lower the learning rate"
                    )
                loss.backward()
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
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
    del params
    return history


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


def _progress(total: int, enabled: bool) -> _Bar:
    return _Bar(total, enabled)


# ---------------------------------------------------------------------------------------------
# The whole job
# ---------------------------------------------------------------------------------------------


@dataclass
class FinetuneArgs:
    """Options of :func:`finetune` (the ``unilora train`` flags)."""

    model: Path
    out: Path
    data: Path | None = None
    eval_data: Path | None = None
    eval_fraction: float = 0.1
    task: str = "classification"
    text_column: str = "text"
    label_column: str = "label"
    rank: int = 4
    vector_length: int | None = None
    target_modules: list[str] | str | None = None
    projection: str = "sparse"
    lr: float = 2e-2
    head_lr: float = 2e-3
    epochs: int = 2
    batch_size: int = 32
    max_length: int = 128
    seed: int = 0
    warmup_ratio: float = 0.06
    max_steps: int | None = None
    max_train_examples: int | None = None
    threads: int | None = None
    progress: bool = True
    overwrite: bool = False


@dataclass
class FinetuneResult:
    """What :func:`finetune` produced: the metrics (also in ``metrics.json``), the trained
    model and what is needed to use it further (the demo merges and exports it)."""

    metrics: dict[str, Any]
    model: UniLoRAModel
    tokenizer: Any
    labels: LabelMap | None
    train_examples: list[Example]
    eval_examples: list[Example]
    eval_batches: list[Batch] = field(default_factory=list)


def _load_examples(
    args: FinetuneArgs,
    train_rows: Sequence[dict[str, Any]] | None,
    eval_rows: Sequence[dict[str, Any]] | None,
) -> tuple[list[Example], list[Example], LabelMap | None]:
    if train_rows is None:
        if args.data is None:
            raise InvalidArgumentError("no training data: give --data FILE")
        train_rows = read_records(args.data)
        train_src = str(args.data)
    else:
        train_src = "training data"
    if eval_rows is None and args.eval_data is not None:
        eval_rows = read_records(args.eval_data)
        eval_src = str(args.eval_data)
    else:
        eval_src = "evaluation data"
    labels: LabelMap | None = None
    if args.task == "classification":
        train, labels = classification_examples(
            train_rows,
            text_column=args.text_column,
            label_column=args.label_column,
            source=train_src,
        )
        if eval_rows is not None:
            held, _ = classification_examples(
                eval_rows,
                text_column=args.text_column,
                label_column=args.label_column,
                labels=labels,
                source=eval_src,
            )
        else:
            train, held = split_examples(train, args.eval_fraction, args.seed)
    else:
        train = text_examples(train_rows, text_column=args.text_column, source=train_src)
        if eval_rows is not None:
            held = text_examples(eval_rows, text_column=args.text_column, source=eval_src)
        else:
            train, held = split_examples(train, args.eval_fraction, args.seed, stratify=False)
    if args.max_train_examples is not None:
        train = train[: args.max_train_examples]
    if not held:
        raise InvalidArgumentError(f"{eval_src}: no evaluation examples")
    if labels is not None and len({ex.label for ex in train}) < 2:
        raise InvalidArgumentError(
            "the training split holds a single class; give more data or another split"
        )
    return train, held, labels


def _check_args(args: FinetuneArgs) -> None:
    if args.task not in TASKS:
        raise InvalidArgumentError(f"task {args.task!r} is not one of {', '.join(TASKS)}")
    for name in ("epochs", "batch_size", "rank"):
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
    if args.max_steps is not None and args.max_steps < 1:
        raise InvalidArgumentError(f"max-steps must be at least 1, got {args.max_steps}")
    _check_out(args.out, args.overwrite)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(17, "output path exists and is not a folder", str(out))
    if out.is_dir() and any(out.iterdir()):
        ours = (out / METRICS_NAME).is_file() and (out / "adapter_config.json").is_file()
        if not overwrite:
            raise FileExistsError(
                17,
                "output folder is not empty (use --overwrite to replace an earlier run)",
                str(out),
            )
        if not ours:
            raise FileExistsError(
                17,
                "output folder is not empty and holds no earlier `unilora train` run; "
                "refusing to write into it",
                str(out),
            )


def finetune(
    args: FinetuneArgs,
    *,
    train_rows: Sequence[dict[str, Any]] | None = None,
    eval_rows: Sequence[dict[str, Any]] | None = None,
) -> FinetuneResult:
    """Trains a Uni-LoRA adapter on ``args.data`` (or ``train_rows``), evaluates after each
    epoch and writes the adapter and ``metrics.json`` into ``args.out``."""
    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    train, held, labels = _load_examples(args, train_rows, eval_rows)
    torch.manual_seed(args.seed)
    model, tokenizer, new_tensors = load_task_model(args.model, args.task, labels)
    pad_set = _pad_was_set(args.model, model)
    head = modules_of(new_tensors, model) if args.task == "classification" else []
    probe = UniLoRAConfig(
        rank=args.rank,
        vector_length=1,
        seed=args.seed,
        target_modules=args.target_modules,
        modules_to_save=head or None,
    )
    total = lora_parameter_count(model, probe)
    d = args.vector_length or default_vector_length(total, args.task)
    config = UniLoRAConfig(
        rank=args.rank,
        vector_length=d,
        seed=args.seed,
        target_modules=args.target_modules,
        modules_to_save=head or None,
        projection=args.projection,
        base_model_name_or_path=str(Path(args.model).resolve()),
    )
    wrapped = get_unilora_model(model, config)
    train_enc = encode(tokenizer, train, args.max_length)
    held_enc = encode(tokenizer, held, args.max_length)
    eval_batches = batches(
        held_enc, held, tokenizer, max(args.batch_size, 64), args.task, shuffle=False
    )
    head_params = [p for n, p in wrapped.named_parameters() if p.requires_grad and n != "theta_d"]
    groups: list[dict[str, Any]] = [{"params": [wrapped.theta_d], "lr": args.lr}]
    if head_params:
        groups.append({"params": head_params, "lr": args.head_lr})
    t0 = time.perf_counter()
    history = train_loop(
        wrapped,
        groups,
        lambda epoch: batches(
            train_enc,
            train,
            tokenizer,
            args.batch_size,
            args.task,
            shuffle=True,
            seed=args.seed * 1000 + epoch,
        ),
        task=args.task,
        epochs=args.epochs,
        eval_data=eval_batches,
        warmup_ratio=args.warmup_ratio,
        max_steps=args.max_steps,
        progress=args.progress,
    )
    seconds = time.perf_counter() - t0
    wrapped.eval()
    metrics = _metrics(args, wrapped, labels, train, held, history, seconds, new_tensors)
    task = task_record(args.task, model, labels, new_tensors, pad_set)
    _save(args.out, wrapped, metrics, task)
    metrics["adapter_bytes"] = _adapter_bytes(args.out)
    (args.out / METRICS_NAME).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return FinetuneResult(metrics, wrapped, tokenizer, labels, train, held, eval_batches)


def _pad_was_set(model_dir: str | os.PathLike[str], model: nn.Module) -> bool:
    """True when the model folder's config has no pad_token_id and one was set on load."""
    try:
        saved = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return saved.get("pad_token_id") is None and model.config.pad_token_id is not None  # type: ignore[union-attr]


def lora_parameter_count(model: nn.Module, probe: UniLoRAConfig) -> int:
    """``D`` for ``probe``'s rank, targets and exclusions on ``model`` (nothing is wrapped)."""
    from .config import find_modules_to_save, find_targets, module_features

    saved = find_modules_to_save(model, probe)
    total = 0
    for _, module, kind in find_targets(model, probe, saved):
        fan_in, fan_out = module_features(module, kind)
        total += probe.rank * (fan_in + fan_out)
    if total == 0:
        raise InvalidArgumentError(
            f"target_modules={probe.target_modules!r} matches no nn.Linear / Conv1D layer"
        )
    return total


def _metrics(
    args: FinetuneArgs,
    model: UniLoRAModel,
    labels: LabelMap | None,
    train: Sequence[Example],
    held: Sequence[Example],
    history: list[dict[str, Any]],
    seconds: float,
    new_tensors: Sequence[str],
) -> dict[str, Any]:
    steps = history[-1]["steps"] if history else 0
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n != "theta_d")
    final = history[-1] if history else {}
    out: dict[str, Any] = {
        "task": args.task,
        "model": str(args.model),
        "data": str(args.data) if args.data else None,
        "eval_data": str(args.eval_data) if args.eval_data else None,
        "train_examples": len(train),
        "eval_examples": len(held),
    }
    for key in ("eval_accuracy", "eval_loss", "eval_perplexity"):
        if key in final:
            out[key] = final[key]
    out.update(
        {
            "labels": labels.id2label if labels is not None else None,
            "rank": args.rank,
            "projection": model.adapter_config.projection,
            "vector_length": model.theta_d.numel(),
            "total_size": model.total_size,
            "adapted_modules": len(model.adapter_config.modules),
            "target_modules": model.adapter_config.target_modules,
            "trainable_parameters": {
                "theta_d": model.theta_d.numel(),
                "head": head,
                "total": model.theta_d.numel() + head,
            },
            "lora_parameters_same_rank": model.total_size,
            "new_tensors": list(new_tensors),
            "epochs": args.epochs,
            "steps": steps,
            "train_seconds": seconds,
            "seconds_per_step": seconds / max(steps, 1),
            "lr": args.lr,
            "head_lr": args.head_lr,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "seed": args.seed,
            "warmup_ratio": args.warmup_ratio,
            "threads": torch.get_num_threads(),
            "history": history,
        }
    )
    return out


def task_record(
    task: str, base: nn.Module, labels: LabelMap | None, new_tensors: Sequence[str], pad_set: bool
) -> dict[str, Any]:
    """The adapter's ``task`` entry: what a merge needs to rebuild the trained model
    (the architecture, the label names, the new head tensors)."""
    config: dict[str, Any] = {"architectures": [type(base).__name__]}
    if task == "classification" and labels is not None:
        config.update(
            id2label={str(i): n for i, n in labels.id2label.items()},
            label2id=labels.label2id,
            problem_type="single_label_classification",
        )
    if pad_set:
        config["pad_token_id"] = base.config.pad_token_id  # type: ignore[union-attr]
    kind = "sequence-classification" if task == "classification" else "causal-lm"
    return {"type": kind, "config": config, "new_tensors": sorted(new_tensors)}


def _save(
    out: Path,
    model: UniLoRAModel,
    metrics: dict[str, Any],
    task: dict[str, Any],
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.adapter_config.task = task
    model.save_pretrained(out)
    (out / METRICS_NAME).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")


def _adapter_bytes(out: Path) -> int:
    return sum(
        (out / n).stat().st_size for n in ("adapter_config.json", "adapter_model.safetensors")
    )


def args_dict(args: FinetuneArgs) -> dict[str, Any]:
    """``args`` as JSON-ready values."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(args).items()}
