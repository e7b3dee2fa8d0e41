"""The ``unilora train`` job: options, data loading, training, metrics, saving.

:func:`finetune` runs the whole job (load, build the adapter, train, evaluate after each
epoch, save the adapter and ``metrics.json``).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..._util import write_bytes_atomic
from ...datasets import LabelMap
from ...errors import InvalidArgumentError
from ...train_options import FinetuneArgs
from ..config import UniLoRAConfig
from ..model import UniLoRAModel, get_unilora_model
from .data import Batch
from .generation import generate_answers, judge, write_samples
from .inputs import Examples, Prepared, load_examples, prepare
from .loop import LoopOptions, evaluate, train_loop
from .models import (
    check_tokenizer,
    default_model_dir,
    default_vector_length,
    enable_gradient_checkpointing,
    fit_max_length,
    load_task_model,
    lora_parameter_count,
    modules_of,
    pad_was_set,
    task_record,
)
from .sft import EvalPrompt, stop_token_ids

__all__ = [
    "METRICS_NAME",
    "SAMPLES_NAME",
    "FinetuneArgs",
    "FinetuneResult",
    "Judged",
    "args_dict",
    "finetune",
    "pick_device",
    "resolved",
    "summary",
]

METRICS_NAME = "metrics.json"


@dataclass
class FinetuneResult:
    """What :func:`finetune` produced: the metrics (also in ``metrics.json``), the trained
    model and what is needed to use it further (the demos merge and export it)."""

    metrics: dict[str, Any]
    model: UniLoRAModel
    tokenizer: Any
    labels: LabelMap | None
    train_examples: list[Any]
    eval_examples: list[Any]
    eval_batches: list[Batch] = field(default_factory=list)
    #: Instruction data: the held-out prompts judged by generation, and the answers.
    eval_prompts: list[EvalPrompt] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)


@dataclass
class Judged:
    """Greedy answers to the held-out prompts and the metrics they give."""

    answers: list[str]
    metrics: dict[str, Any]


def _check_args(args: FinetuneArgs) -> None:
    args.check()
    _check_out(args.out, args.overwrite)  # type: ignore[arg-type]


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(17, "output path exists and is not a folder", str(out))
    _check_writable(out)
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


def _check_writable(out: Path) -> None:
    """Fails now, before any training, when ``out`` cannot be created or written: the
    nearest existing folder on its path must take a new file (nothing is left there)."""
    folder = out
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(
            20, f"the output folder cannot be created: {folder} is not a folder", str(out)
        )
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise type(err)(
            err.errno, f"the output folder is not writable ({err.strerror})", str(out)
        ) from None


def resolved(args: FinetuneArgs) -> FinetuneArgs:
    """``args`` with the defaults that depend on others filled in: the task's defaults,
    the model (the packaged all-MiniLM-L6-v2, or SmolLM2-135M-Instruct for sft) and the
    output folder (``DATA-unilora`` beside the data)."""
    args = args.with_task_defaults()
    model = args.model if args.model is not None else default_model_dir(args.task)
    out = args.out
    if out is None:
        if args.data is None:
            raise InvalidArgumentError("no output folder: give --out DIR")
        out = args.data.with_name(f"{args.data.stem}-unilora")
    return replace(args, model=Path(model), out=Path(out))


def pick_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else the CPU), ``cpu`` or ``cuda``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError("--device cuda: torch sees no CUDA device")
    return torch.device(name)


@dataclass
class _Run:
    """What one job holds while it runs."""

    args: FinetuneArgs
    data: Examples
    model: UniLoRAModel
    tokenizer: Any
    new_tensors: list[str]
    pad_set: bool
    device: torch.device
    max_length: int
    stops: list[int]


def _start(args: FinetuneArgs, train_rows: Any, eval_rows: Any) -> _Run:
    """Checks the options, reads the data, loads the model and wraps it."""
    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_examples(args, train_rows, eval_rows)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model, tokenizer, new_tensors = load_task_model(args.model, args.task, data.labels, dtype=dtype)  # type: ignore[arg-type]
    check_tokenizer(tokenizer, data.train, Path(args.model))  # type: ignore[arg-type]
    pad_set = pad_was_set(args.model, model)  # type: ignore[arg-type]
    max_length = fit_max_length(args.max_length, model)  # type: ignore[arg-type]
    stops = stop_token_ids(tokenizer, model) if args.task != "classification" else []
    wrapped = _build_adapter(args, model, new_tensors).to(device)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(wrapped.base_model)
    return _Run(args, data, wrapped, tokenizer, new_tensors, pad_set, device, max_length, stops)


def finetune(
    args: FinetuneArgs,
    *,
    train_rows: Sequence[dict[str, Any]] | None = None,
    eval_rows: Sequence[dict[str, Any]] | None = None,
) -> FinetuneResult:
    """Trains a Uni-LoRA adapter on ``args.data`` (or ``train_rows``), evaluates after each
    epoch (and every ``eval_steps``), judges instruction data by generation, and writes
    the adapter, ``metrics.json`` (and ``eval_samples.jsonl``) into ``args.out``."""
    run = _start(resolved(args), train_rows, eval_rows)
    args = run.args
    prep = prepare(args, run.tokenizer, run.data, run.max_length, run.stops)
    base = _judge(run, prep, base=True) if args.eval_base and args.task == "sft" else None
    t0 = time.perf_counter()
    history = train_loop(
        run.model,
        _param_groups(args, run.model),
        prep.train,
        task=args.task,
        eval_data=prep.held,
        options=LoopOptions(
            epochs=args.epochs,  # type: ignore[arg-type]
            max_steps=args.max_steps,
            warmup_ratio=args.warmup_ratio,
            schedule=args.lr_scheduler,
            grad_accum=args.gradient_accumulation_steps,
            eval_steps=args.eval_steps,
            device=run.device,
            progress=args.progress,
        ),
    )
    # the optimizer steps' time (the log records exclude the held-out evaluations)
    steps_s = float(sum(r["train_seconds"] for r in history))
    seconds = (steps_s, time.perf_counter() - t0 - steps_s)
    run.model.eval()
    judged = _judge(run, prep, base=False) if args.task == "sft" else None
    metrics = _metrics(run, prep, history, seconds, judged, base)
    _save(run, prep, metrics, judged, base)
    return FinetuneResult(
        metrics,
        run.model,
        run.tokenizer,
        run.data.labels,
        run.data.train,
        run.data.held,
        prep.held,
        prep.prompts,
        judged.answers if judged else [],
    )


def _build_adapter(args: FinetuneArgs, model: nn.Module, new_tensors: list[str]) -> UniLoRAModel:
    """Wraps ``model`` with the adapter ``args`` describe: ``d`` from the paper's ratio
    unless given, the new head (classification) saved in full."""
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
        base_model_name_or_path=str(Path(args.model).resolve()),  # type: ignore[arg-type]
    )
    return get_unilora_model(model, config)


def _param_groups(args: FinetuneArgs, model: UniLoRAModel) -> list[dict[str, Any]]:
    """``theta_d`` at ``lr``; the saved head (if any) at ``head_lr``."""
    head = [p for n, p in model.named_parameters() if p.requires_grad and n != "theta_d"]
    groups: list[dict[str, Any]] = [{"params": [model.theta_d], "lr": args.lr}]
    if head:
        groups.append({"params": head, "lr": args.head_lr})
    return groups


def _max_new_tokens(run: _Run, prompts: list[EvalPrompt]) -> tuple[int, int]:
    """``(max_new_tokens, longest reference in tokens)``."""
    longest = max(
        (len(run.tokenizer(p.reference, add_special_tokens=False)["input_ids"]) for p in prompts),
        default=0,
    )
    given = run.args.max_new_tokens
    return (given if given is not None else min(longest + 4, 256)), longest


def _judge(run: _Run, prep: Prepared, *, base: bool) -> Judged:
    """Greedy generation on the held-out prompts by the trained model or (``base``) by
    the base model with the adapter switched off, which also gets its held-out loss
    (the trained model's is in the last log record)."""
    context = run.model.disable_adapter() if base else contextlib.nullcontext()
    with context:
        metrics: dict[str, Any] = (
            evaluate(run.model, prep.held, "sft", device=run.device) if base else {}
        )
        if not prep.prompts:
            return Judged([], metrics)
        new_tokens, longest = _max_new_tokens(run, prep.prompts)
        answers = generate_answers(
            run.model,
            run.tokenizer,
            prep.prompts,
            max_new_tokens=new_tokens,
            stops=run.stops,
            batch_size=2 * (run.args.batch_size or 8),
            device=run.device,
        )
    metrics.update(judge(prep.prompts, answers, longest))
    metrics["max_new_tokens"] = new_tokens
    return Judged(answers, metrics)


def _metrics(
    run: _Run,
    prep: Prepared,
    history: list[dict[str, Any]],
    seconds: tuple[float, float],
    judged: Judged | None,
    base: Judged | None,
) -> dict[str, Any]:
    args, model = run.args, run.model
    steps = history[-1]["steps"] if history else 0
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n != "theta_d")
    final = dict(history[-1]) if history else {}
    if judged is not None:
        final.update(judged.metrics)
    out: dict[str, Any] = {
        "task": args.task,
        "model": str(args.model),
        "data": str(args.data) if args.data else None,
        "eval_data": str(args.eval_data) if args.eval_data else None,
        "train_examples": len(run.data.train),
        "eval_examples": len(run.data.held),
    }
    for key in (*EVAL_KEYS, "eval_generated", "max_new_tokens"):
        if key in final:
            out[key] = final[key]
    if base is not None:
        out["base"] = base.metrics
    if prep.truncation:
        out["truncation"] = prep.truncation
        out["eval_prompts_too_long"] = prep.prompts_too_long
    out.update(
        {
            "labels": run.data.labels.id2label if run.data.labels is not None else None,
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
            "new_tensors": list(run.new_tensors),
            "epochs": args.epochs,
            "steps": steps,
            "train_seconds": seconds[0],
            "seconds_per_step": seconds[0] / max(steps, 1),
            "eval_seconds_during_training": seconds[1],
            **{k: getattr(args, k) for k in RECORDED_ARGS},
            "max_length": run.max_length,
            "device": str(run.device),
            "threads": torch.get_num_threads(),
            "history": history,
        }
    )
    return out


#: The options metrics.json repeats.
RECORDED_ARGS = (
    "lr",
    "head_lr",
    "lr_scheduler",
    "batch_size",
    "gradient_accumulation_steps",
    "seed",
    "warmup_ratio",
)
#: The evaluation metrics metrics.json lifts from the last record.
EVAL_KEYS = ("eval_accuracy", "eval_exact_match", "eval_loss", "eval_perplexity")
SAMPLES_NAME = "eval_samples.jsonl"


def _save(
    run: _Run, prep: Prepared, metrics: dict[str, Any], judged: Judged | None, base: Judged | None
) -> None:
    """Writes the adapter, then ``eval_samples.jsonl`` and ``metrics.json`` (once, with
    the adapter's size), each atomically; when one fails (a full disk) the run's files
    are removed, so that no half-written run is left."""
    out = run.args.out
    assert out is not None
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        _write_run(run, prep, metrics, judged, base, out)
    except BaseException:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise


#: The files a run writes into ``--out``.
RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", SAMPLES_NAME, METRICS_NAME)


def _write_run(
    run: _Run,
    prep: Prepared,
    metrics: dict[str, Any],
    judged: Judged | None,
    base: Judged | None,
    out: Path,
) -> None:
    model = run.model
    model.adapter_config.task = task_record(
        run.args.task, model.base_model, run.data.labels, run.new_tensors, run.pad_set
    )
    model.save_pretrained(out)
    metrics["adapter_bytes"] = sum(
        (out / n).stat().st_size for n in ("adapter_config.json", "adapter_model.safetensors")
    )
    if judged is not None and judged.answers:
        extra = {"base_generated": base.answers} if base is not None and base.answers else {}
        write_samples(out / SAMPLES_NAME, prep.prompts, judged.answers, **extra)
    write_bytes_atomic(out / METRICS_NAME, (json.dumps(metrics, indent=2) + "\n").encode())


def args_dict(args: FinetuneArgs) -> dict[str, Any]:
    """``args`` as JSON-ready values."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(args).items()}


def summary(m: dict[str, Any], out: Path) -> str:
    """The lines ``unilora train`` prints after training."""
    tp = m["trainable_parameters"]
    lines = [
        f"trained {m['steps']} steps in {m['train_seconds']:.1f} s on {m['train_examples']:,} "
        f"examples ({m['seconds_per_step']:.3f} s/step)"
    ]
    if "eval_accuracy" in m:
        lines.append(
            f"eval accuracy {m['eval_accuracy']:.4f}, eval loss {m['eval_loss']:.4f} "
            f"({m['eval_examples']:,} examples)"
        )
    else:
        lines.append(
            f"eval loss {m['eval_loss']:.4f}, perplexity {m['eval_perplexity']:.2f} "
            f"({m['eval_examples']:,} examples)"
        )
    if "eval_generated" in m:
        lines.append(_generation_line(m))
    lines.append(
        f"trainable: theta_d {tp['theta_d']:,} + head {tp['head']:,}; a LoRA of the same "
        f"rank trains {m['lora_parameters_same_rank']:,} ({m['adapted_modules']} modules)"
    )
    files = f", metrics.json and {SAMPLES_NAME}" if "eval_generated" in m else " and metrics.json"
    lines.append(f"adapter ({m['adapter_bytes']:,} bytes){files} in {out}")
    return "\n".join(lines)


def _generation_line(m: dict[str, Any]) -> str:
    n = m["eval_generated"]
    if "eval_exact_match" not in m:
        return f"generated answers to {n:,} held-out prompts (long answers: no exact match)"
    line = f"exact match {m['eval_exact_match']:.4f} on {n:,} held-out prompts (greedy)"
    base = m.get("base", {})
    if "eval_exact_match" in base:
        line += f"; the base model without the adapter: {base['eval_exact_match']:.4f}"
    return line
