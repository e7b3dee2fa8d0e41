"""The classifier demo (``unilora demo``): all-MiniLM-L6-v2 learns the sentiment of real
movie-review sentences.

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

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidArgumentError
from ..train_options import FinetuneArgs
from .options import DemoArgs
from .workdir import dir_bytes, prepare_out, write_csv

__all__ = ["BASELINE_LR", "run"]

#: What a run writes into its folder (a user's file of such a name is refused first).
WRITES = (
    "data",
    "adapter",
    "baseline",
    "merged",
    "lora",
    "model.onnx",
    "model.onnx.data",
    "demo.json",
)

#: Learning rate of the head-only baseline (chosen on the validation split by
#: examples/compare.py; docs/results/compare.md).
BASELINE_LR = 5e-2


@dataclass
class _Data:
    model_dir: Path
    train_csv: Path
    test_csv: Path


#: Where the held-out examples start in the shuffled sentences (after the training and
#: validation rows).
TEST_AT = 4000


def _check(demo: DemoArgs) -> None:
    """The example counts, before the demo folder is touched."""
    from ..datasets import sentiment_sentences

    if demo.train_examples < 10 or demo.eval_examples < 10:
        raise InvalidArgumentError("--train-examples and --eval-examples must be at least 10")
    held = len(sentiment_sentences()) - TEST_AT
    if demo.train_examples > 3000 or demo.eval_examples > held:
        raise InvalidArgumentError(f"at most 3000 training and {held} evaluation examples")


def _write_data(demo: DemoArgs, out: Path) -> _Data:
    """The fixed split of examples/compare.py: the 10,568 labelled sentences shuffled
    with seed 0; train [0, 3000), validation [3000, 4000) (unused here), test from 4000."""
    from ..datasets import packaged_model_dir, sentiment_sentences

    model_dir = packaged_model_dir()
    rows = sentiment_sentences()
    random.Random(0).shuffle(rows)
    data = _Data(model_dir, out / "data" / "train.csv", out / "data" / "test.csv")
    write_csv(data.train_csv, rows[: demo.train_examples])
    write_csv(data.test_csv, rows[TEST_AT : TEST_AT + demo.eval_examples])
    print(
        f"data: {demo.train_examples:,} training and {demo.eval_examples:,} held-out "
        f"movie-review sentences (Hutto & Gilbert 2014 / Pang & Lee 2005) -> {out / 'data'}"
    )
    print(f"model: all-MiniLM-L6-v2 ({model_dir})")
    return data


def run(demo: DemoArgs, options: dict[str, Any]) -> int:
    """Runs the demo with the training ``options`` the user gave (FinetuneArgs fields)."""
    from ..torch.training import finetune, summary

    _check(demo)
    if options.get("threads"):
        torch.set_num_threads(options["threads"])
    out = demo.out
    prepare_out(out, WRITES)
    data = _write_data(demo, out)
    train_args = FinetuneArgs(
        model=data.model_dir,
        data=data.train_csv,
        eval_data=data.test_csv,
        out=out / "adapter",
        **options,
    ).with_task_defaults()
    print("\n[1/4] baseline: frozen model, trained classification head")
    base = _head_only(train_args, demo.baseline_lr or BASELINE_LR, out / "baseline")
    print(
        f"      eval accuracy {base['eval_accuracy']:.4f} "
        f"({base['trainable']:,} trainable, {base['seconds']:.1f} s)"
    )
    print("\n[2/4] unilora train: Uni-LoRA on the query and value projections")
    result = finetune(train_args)
    print(summary(result.metrics, out / "adapter"))
    checks, merge_s = _merge_and_check(result, data.model_dir, out)
    if demo.onnx:
        print("\n[4/4] export ONNX and check onnxruntime")
        checks.update(_check_onnx(result, out / "merged", out / "model.onnx"))
        print(
            f"      same labels on {checks['onnx_agreement']:.2%} of the held-out set, "
            f"max |logit difference| {checks['onnx_max_diff']:.2e} ({out / 'model.onnx'})"
        )
    return _report(out, base, result.metrics, checks, merge_s)


def _merge_and_check(result: Any, model_dir: Path, out: Path) -> tuple[dict[str, float], float]:
    from ..merging import merge

    print("\n[3/4] merge with the Rust core (no torch) and check the merged model")
    t0 = time.perf_counter()
    merge(model_dir, out / "adapter", out / "merged")
    merge_s = time.perf_counter() - t0
    checks = _check_merged(result, out / "merged")
    print(
        f"      merged in {merge_s:.2f} s; same labels on {checks['merged_agreement']:.2%} of "
        f"the held-out set, max |logit difference| {checks['merged_max_diff']:.2e}"
    )
    return checks, merge_s


def _report(
    out: Path,
    base: dict[str, Any],
    metrics: dict[str, Any],
    checks: dict[str, float],
    merge_s: float,
) -> int:
    from ..export.lora import export_lora

    # PEFT's LoRA format with the head kept (what PEFT would save for the same run).
    export_lora(out / "adapter", out / "lora", saved_modules="keep")
    ours = metrics["adapter_bytes"]
    lora = dir_bytes(out / "lora")
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


def _head_only(args: FinetuneArgs, lr: float, out: Path) -> dict[str, Any]:
    """The frozen model with a trained head: the baseline every adapter must beat."""
    from ..datasets import classification_examples, read_records
    from ..torch.training import batches, encode, evaluate, load_task_model, modules_of

    train, labels = classification_examples(read_records(args.data))  # type: ignore[arg-type]
    held, _ = classification_examples(read_records(args.eval_data), labels=labels)  # type: ignore[arg-type]
    torch.manual_seed(args.seed)
    model, tok, new = load_task_model(args.model, "classification", labels)  # type: ignore[arg-type]
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for name in modules_of(new, model) for p in model.get_submodule(name).parameters()]
    for p in params:
        p.requires_grad_(True)
    enc = encode(tok, train, args.max_length)
    held_b = batches(
        encode(tok, held, args.max_length), held, tok, 64, "classification", shuffle=False
    )
    t0 = time.perf_counter()
    history = _train_head(args, model, params, lr, enc, train, tok)
    seconds = time.perf_counter() - t0
    return {
        **evaluate(model, held_b, "classification"),
        "trainable": sum(p.numel() for p in params),
        "lr": lr,
        "steps": history[-1]["steps"],
        "seconds": seconds,
    }


def _train_head(
    args: FinetuneArgs, model: Any, params: list[Any], lr: float, enc: Any, train: Any, tok: Any
) -> list[dict[str, Any]]:
    from ..torch.training import batches, train_loop

    return train_loop(
        model,
        [{"params": params, "lr": lr}],
        lambda epoch: batches(
            enc,
            train,
            tok,
            args.batch_size,
            "classification",
            shuffle=True,
            seed=args.seed * 1000 + epoch,
        ),
        task="classification",
        epochs=args.epochs,
        max_steps=args.max_steps,
        progress=args.progress,
    )


def _check_merged(result: Any, merged: Path) -> dict[str, float]:
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
