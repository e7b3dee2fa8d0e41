"""Score a merged ``unilora demo llm`` model with lm-evaluation-harness and compare it,
prompt by prompt, with ``unilora train``'s own generation metric.

The task is examples/lm_eval/unilora_sentiment.yaml (a local JSONL file, no Hub): the
demo's held-out chat rows, the user turn rendered with the chat template, greedy
generation, exact match ignoring case and punctuation. This script

1. merges the adapter into the base model with the Rust merge (``RUN/merged``);
2. runs lm-eval on the merged model (its Python API; the same as the ``lm_eval``
   command in docs/TRAINING.md) with the task's data pointed at ``RUN/data/test.jsonl``;
3. compares lm-eval's accuracy and its answer to every prompt with ``metrics.json``
   and ``eval_samples.jsonl`` of ``RUN/adapter``, and writes ``RUN/lm_eval.json``.

    unilora demo llm
    python examples/lm_eval_check.py                 # RUN = unilora-demo-llm
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

TASK_FILE = Path(__file__).resolve().parent / "lm_eval" / "unilora_sentiment.yaml"


def task_config(test_jsonl: Path) -> dict[str, Any]:
    """The repository's task with its data file replaced by ``test_jsonl``."""
    import yaml

    cfg = yaml.safe_load(TASK_FILE.read_text(encoding="utf-8"))
    cfg["dataset_kwargs"] = {"data_files": {"test": str(test_jsonl.resolve())}}
    return dict(cfg)


def run_lm_eval(merged: Path, test_jsonl: Path, batch_size: int) -> dict[str, Any]:
    """lm-eval's accuracy and per-document answers (in the file's order)."""
    import lm_eval

    cfg = task_config(test_jsonl)
    res = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={merged},dtype=float32",
        tasks=[cfg],
        device="cpu",
        batch_size=batch_size,
        log_samples=True,
        apply_chat_template=True,
    )
    name = cfg["task"]
    samples = sorted(res["samples"][name], key=lambda s: s["doc_id"])
    return {
        "exact_match": float(res["results"][name]["exact_match,strip"]),
        "answers": [s["filtered_resps"][0] for s in samples],
        "prompts": [s["arguments"][0][0] for s in samples],
    }


def compare(lm: dict[str, Any], adapter: Path) -> dict[str, Any]:
    """Agreement of lm-eval's answers with ``eval_samples.jsonl``, both accuracies."""
    from unilora_rs.torch.training import normalize_answer

    metrics = json.loads((adapter / "metrics.json").read_text(encoding="utf-8"))
    ours = [
        json.loads(line)
        for line in (adapter / "eval_samples.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    ours.sort(key=lambda s: s["row"])
    if [s["row"] for s in ours] != list(range(len(lm["answers"]))):
        raise SystemExit("eval_samples.jsonl does not hold every row of the test file")
    same_prompt = sum(a == s["prompt"] for a, s in zip(lm["prompts"], ours, strict=True))
    agree = sum(
        normalize_answer(a) == normalize_answer(s["generated"])
        for a, s in zip(lm["answers"], ours, strict=True)
    )
    n = len(ours)
    return {
        "documents": n,
        "lm_eval_exact_match": lm["exact_match"],
        "unilora_exact_match": metrics["eval_exact_match"],
        "same_prompt_text": same_prompt / n,
        "same_answer": agree / n,
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--run", type=Path, default=Path("unilora-demo-llm"), help="demo folder")
    ap.add_argument("--base", type=Path, default=None, help="base model folder (default: packaged)")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import unilora_rs as ur
    from unilora_rs.torch.training import packaged_llm_dir

    merged = args.run / "merged"
    if not (merged / "config.json").is_file():
        ur.merge(args.base or packaged_llm_dir(), args.run / "adapter", merged)
    lm = run_lm_eval(merged, args.run / "data" / "test.jsonl", args.batch_size)
    report = compare(lm, args.run / "adapter")
    (args.run / "lm_eval.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for key, value in report.items():
        print(f"{key:22s} {value:.4f}" if isinstance(value, float) else f"{key:22s} {value}")
    return 0 if report["same_answer"] >= 0.95 else 1


if __name__ == "__main__":
    raise SystemExit(main())
