"""``unilora demo``: the main job end to end on a real model and real text, offline.

1. writes the packaged sentiment sentences as CSV files (3,000 to train on, 2,000 held
   out) and trains the frozen model's classification head alone, as the baseline;
2. ``unilora train`` on them: one vector ``theta_d`` (5,760 numbers) plus the head;
3. merges the adapter into the packaged model with the Rust merge (no torch involved)
   and checks that the merged model predicts what the trained model predicts;
4. exports the merged model to ONNX and checks onnxruntime's predictions likewise;
5. prints a table: accuracy, trainable parameters, adapter size against a LoRA of the
   same rank (the exact LoRA export, measured), train time.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError
from .train import add_training_options, parse_targets

DEMO_MARKER = "unilora-demo.json"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "demo",
        help="fine-tune, evaluate, merge and export all-MiniLM-L6-v2 on real sentiment data",
        description=(
            "Trains a Uni-LoRA adapter on 3,000 real movie-review sentences, evaluates on "
            "2,000 held-out ones against the frozen model with a trained head, merges the "
            "adapter with the Rust merge, exports ONNX and checks that every form predicts "
            "the same labels. Offline: model and data come from installed packages."
        ),
    )
    p.add_argument("--out", type=Path, default=Path("unilora-demo"), help="work folder")
    p.add_argument("--train-examples", type=int, default=3000)
    p.add_argument("--eval-examples", type=int, default=2000)
    p.add_argument("--baseline-lr", type=float, default=None, help="lr of the head-only baseline")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    add_training_options(p)
    p.set_defaults(run=run)


def _write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)


def _prepare_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / DEMO_MARKER).is_file():
            raise FileExistsError(
                17, "demo folder exists, is not empty and is no earlier demo run", str(out)
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text(json.dumps({"created_by": "unilora demo"}) + "\n")


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import export_lora, merge
    from ..datasets import packaged_model_dir, sentiment_sentences
    from ..torch.training import FinetuneArgs, finetune
    from .train import summary

    if args.train_examples < 10 or args.eval_examples < 10:
        raise InvalidArgumentError("--train-examples and --eval-examples must be at least 10")
    if args.threads:
        torch.set_num_threads(args.threads)
    out: Path = args.out
    _prepare_out(out)
    model_dir = packaged_model_dir()
    rows = sentiment_sentences()
    random.Random(0).shuffle(rows)
    # The same fixed split as examples/compare.py: train [0, 3000), validation
    # [3000, 4000) (unused here), test [4000, 6000).
    if args.train_examples > 3000 or args.eval_examples > len(rows) - 4000:
        raise InvalidArgumentError(
            f"at most 3000 training and {len(rows) - 4000} evaluation examples"
        )
    train_csv, test_csv = out / "data" / "train.csv", out / "data" / "test.csv"
    _write_csv(train_csv, rows[: args.train_examples])
    _write_csv(test_csv, rows[4000 : 4000 + args.eval_examples])
    print(
        f"data: {args.train_examples:,} training and {args.eval_examples:,} held-out movie-review "
        f"sentences (Hutto & Gilbert 2014 / Pang & Lee 2005) -> {out / 'data'}"
    )
    print(f"model: all-MiniLM-L6-v2 ({model_dir})")
    progress = not args.no_progress

    common: dict[str, Any] = {
        "model": model_dir,
        "data": train_csv,
        "eval_data": test_csv,
        "rank": args.rank,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "seed": args.seed,
        "max_steps": args.max_steps,
        "progress": progress,
    }
    if args.epochs is not None:
        common["epochs"] = args.epochs

    print("\n[1/4] baseline: frozen model, trained classification head")
    base = _head_only(args, common, out / "baseline")
    print(
        f"      eval accuracy {base['eval_accuracy']:.4f} "
        f"({base['trainable']:,} trainable, {base['seconds']:.1f} s)"
    )

    print("\n[2/4] unilora train: Uni-LoRA on the query and value projections")
    options = {k: getattr(args, k) for k in ("lr", "head_lr") if getattr(args, k) is not None}
    result = finetune(
        FinetuneArgs(
            out=out / "adapter",
            vector_length=args.vector_length,
            target_modules=parse_targets(args.target_modules),
            projection=args.projection,
            **common,
            **options,
        )
    )
    metrics = result.metrics
    print(summary(metrics, out / "adapter"))

    print("\n[3/4] merge with the Rust core (no torch) and check the merged model")
    t0 = time.perf_counter()
    merge(model_dir, out / "adapter", out / "merged")
    merge_s = time.perf_counter() - t0
    checks = _check_merged(result, out / "merged")
    print(
        f"      merged in {merge_s:.2f} s; same labels on {checks['merged_agreement']:.2%} of "
        f"the held-out set, max |logit difference| {checks['merged_max_diff']:.2e}"
    )

    if not args.no_onnx:
        print("\n[4/4] export ONNX and check onnxruntime")
        checks.update(_check_onnx(result, out / "merged", out / "model.onnx"))
        print(
            f"      same labels on {checks['onnx_agreement']:.2%} of the held-out set, "
            f"max |logit difference| {checks['onnx_max_diff']:.2e} ({out / 'model.onnx'})"
        )

    # PEFT's LoRA format with the head kept (what PEFT would save for the same run).
    export_lora(out / "adapter", out / "lora", saved_modules="keep")
    ours = metrics["adapter_bytes"]
    lora = _dir_bytes(out / "lora")
    report = {
        "baseline": base,
        "unilora": {k: v for k, v in metrics.items() if k != "history"},
        "checks": checks,
        "adapter_bytes": ours,
        "lora_export_bytes": lora,
        "merge_seconds": merge_s,
    }
    (out / "demo.json").write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(_table(base, metrics, ours, lora))
    ok = checks["merged_agreement"] == 1.0 and checks.get("onnx_agreement", 1.0) >= 0.999
    print(f"\nall checks {'passed' if ok else 'FAILED'}; everything is in {out}")
    return 0 if ok else 1


def _head_only(args: argparse.Namespace, common: dict[str, Any], out: Path) -> dict[str, Any]:
    """The frozen model with a trained head: the baseline every adapter must beat."""
    import torch

    from ..datasets import classification_examples, read_records
    from ..torch.training import (
        FinetuneArgs,
        batches,
        encode,
        evaluate,
        load_task_model,
        modules_of,
        train_loop,
    )

    defaults = FinetuneArgs(model=common["model"], out=out)
    train, labels = classification_examples(read_records(common["data"]))
    held, _ = classification_examples(read_records(common["eval_data"]), labels=labels)
    torch.manual_seed(common["seed"])
    model, tok, new = load_task_model(common["model"], "classification", labels)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for name in modules_of(new, model) for p in model.get_submodule(name).parameters()]
    for p in params:
        p.requires_grad_(True)
    enc = encode(tok, train, common["max_length"])
    held_b = batches(
        encode(tok, held, common["max_length"]), held, tok, 64, "classification", shuffle=False
    )
    lr = args.baseline_lr or BASELINE_LR
    t0 = time.perf_counter()
    history = train_loop(
        model,
        [{"params": params, "lr": lr}],
        lambda epoch: batches(
            enc,
            train,
            tok,
            common["batch_size"],
            "classification",
            shuffle=True,
            seed=common["seed"] * 1000 + epoch,
        ),
        task="classification",
        epochs=common.get("epochs", defaults.epochs),
        max_steps=common["max_steps"],
        progress=common["progress"],
    )
    seconds = time.perf_counter() - t0
    return {
        **evaluate(model, held_b, "classification"),
        "trainable": sum(p.numel() for p in params),
        "lr": lr,
        "steps": history[-1]["steps"],
        "seconds": seconds,
    }


#: Learning rate of the head-only baseline (chosen on the validation split by
#: examples/compare.py; docs/results/compare.md).
BASELINE_LR = 5e-2


def _check_merged(result: Any, merged: Path) -> dict[str, float]:
    import torch
    import transformers

    from ..torch.training import predict_logits, quiet_transformers

    trained = predict_logits(result.model, result.eval_batches)
    with quiet_transformers():
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            str(merged), local_files_only=True
        ).eval()
    got = predict_logits(model, result.eval_batches)
    return {
        "merged_agreement": float((got.argmax(-1) == trained.argmax(-1)).float().mean()),
        "merged_max_diff": float((got - trained).abs().max()),
        "trained_accuracy_check": float(
            (trained.argmax(-1) == torch.tensor([e.label for e in result.eval_examples]))
            .float()
            .mean()
        ),
    }


def _check_onnx(result: Any, merged: Path, path: Path) -> dict[str, float]:
    import numpy as np
    import onnxruntime as ort

    from ..torch.onnx_export import export_adapter_onnx
    from ..torch.training import predict_logits

    export_adapter_onnx(merged, path)
    trained = predict_logits(result.model, result.eval_batches).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    got = np.empty_like(trained)
    for batch in result.eval_batches:
        feeds = {k: v.numpy() for k, v in batch.inputs.items() if k in names}
        got[batch.rows] = sess.run(None, feeds)[0]
    return {
        "onnx_agreement": float((got.argmax(-1) == trained.argmax(-1)).mean()),
        "onnx_max_diff": float(np.abs(got - trained).max()),
    }


def _table(base: dict[str, Any], m: dict[str, Any], ours: int, lora: int) -> str:
    tp = m["trainable_parameters"]
    rows = [
        ("", "frozen model + head", "Uni-LoRA (q, v, r=4) + head"),
        ("held-out accuracy", f"{base['eval_accuracy']:.4f}", f"{m['eval_accuracy']:.4f}"),
        ("trainable: adapter", "0", f"{tp['theta_d']:,} (theta_d)"),
        ("trainable: head", f"{base['trainable']:,}", f"{tp['head']:,}"),
        (
            "adapter files",
            "-",
            f"{ours:,} bytes (LoRA r={m['rank']} export: {lora:,} bytes, "
            f"{m['lora_parameters_same_rank']:,} params)",
        ),
        (
            "train time",
            f"{base['seconds']:.1f} s",
            f"{m['train_seconds']:.1f} s ({m['steps']} steps)",
        ),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows)
