"""The driver shared by examples/compare.py (classifier) and examples/compare_llm.py
(instruction tuning): each run in its own process and cached as JSON, the learning
rate chosen on validation, the summary rows and the Markdown table.

A run's JSON holds ``method``, ``variant``, ``lr``, ``seed`` and at least
``val_accuracy``, ``test_accuracy``, ``trainable_adapter``, ``trainable_head``,
``adapter_bytes``, ``seconds_per_step`` and ``peak_rss_mb``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

Label = Callable[[str, int], str]


def run_key(spec: dict[str, Any]) -> str:
    return f"{spec['method']}-{spec['variant']}-lr{spec['lr']:g}-s{spec['seed']}"


def run_cached(spec: dict[str, Any], runs: Path, quick: bool, script: str) -> dict[str, Any]:
    """``script --run-one SPEC`` in its own process, its JSON cached in ``runs``."""
    path = runs / f"{run_key(spec)}.json"
    if path.exists() and not quick:
        return dict(json.loads(path.read_text()))
    cmd = [sys.executable, script, "--run-one", json.dumps(spec)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"run {run_key(spec)} failed")
    result = dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    result["wall_seconds"] = time.perf_counter() - t0
    if not quick:
        runs.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, path)
    print(
        f"  {run_key(spec):40s} val {result['val_accuracy']:.4f} test "
        f"{result['test_accuracy']:.4f} ({result['wall_seconds']:.0f} s)",
        flush=True,
    )
    return result


def select(results: list[dict[str, Any]]) -> dict[tuple[str, int], float]:
    """Per (method, variant): the learning rate with the best validation accuracy at
    seed 0 (ties: the smaller learning rate)."""
    best: dict[tuple[str, int], tuple[float, float]] = {}
    for r in results:
        if r["seed"] != 0:
            continue
        key = (r["method"], r["variant"])
        cand = (r["val_accuracy"], -r["lr"])
        if key not in best or cand > best[key]:
            best[key] = cand
    return {k: -v[1] for k, v in best.items()}


def summarize(
    results: list[dict[str, Any]],
    timing: dict[str, float] | None,
    label: Label,
    order: Sequence[str],
) -> dict[str, Any]:
    """One row per (method, variant) at its chosen learning rate: test accuracy over
    the seeds run (mean, std), the validation sweep, sizes and speed."""
    rows = []
    for (method, variant), lr in select(results).items():
        runs = [r for r in results if (r["method"], r["variant"], r["lr"]) == (method, variant, lr)]
        acc = [r["test_accuracy"] for r in runs]
        sweep = {
            f"{r['lr']:g}": r["val_accuracy"]
            for r in results
            if (r["method"], r["variant"], r["seed"]) == (method, variant, 0)
        }
        rows.append(
            {
                "method": method,
                "variant": variant,
                "label": label(method, variant),
                "lr": lr,
                "seeds": sorted(r["seed"] for r in runs),
                "test_accuracy": acc,
                "mean": statistics.mean(acc),
                "std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                "val_accuracy_by_lr": sweep,
                "trainable_adapter": runs[0]["trainable_adapter"],
                "trainable_head": runs[0]["trainable_head"],
                "adapter_bytes": runs[0]["adapter_bytes"],
                "seconds_per_step_runs": statistics.median(r["seconds_per_step"] for r in runs),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            }
        )
    rows.sort(key=lambda r: (list(order).index(r["method"]), -r["variant"]))
    return {"rows": rows, "step_seconds_interleaved": timing}


def table(
    summary: dict[str, Any],
    metric: str = "test accuracy",
    params: str = "trainable params (no head)",
    files: str = "adapter file bytes (with head)",
) -> str:
    """The Markdown table of :func:`summarize`'s rows."""
    timing = summary.get("step_seconds_interleaved") or {}
    lines = [
        f"| method | {metric} (mean ± std) | seeds | lr (chosen on validation) "
        f"| {params} | {files} "
        "| s / step (interleaved) | peak RSS MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in summary["rows"]:
        inter = timing.get(r["label"])
        acc = f"{r['mean']:.4f}" + (f" ± {r['std']:.4f}" if len(r["seeds"]) > 1 else "")
        lines.append(
            f"| {r['label']} | {acc} | {len(r['seeds'])} | {r['lr']:g} "
            f"| {r['trainable_adapter']:,} | {r['adapter_bytes']:,} "
            f"| {'' if inter is None else f'{inter:.3f}'} "
            f"| {r['peak_rss_mb']:,.0f} |"
        )
    return "\n".join(lines)


def sweep_lines(summary: dict[str, Any]) -> list[str]:
    """Markdown rows: the validation accuracy of every learning rate tried (seed 0)."""
    lines = ["| method | lr: validation accuracy |", "| --- | --- |"]
    for r in summary["rows"]:
        sweep = ", ".join(f"{lr}: {acc:.3f}" for lr, acc in r["val_accuracy_by_lr"].items())
        lines.append(f"| {r['label']} | {sweep} |")
    return lines


def sweep_and_seeds(
    sweep: dict[tuple[str, int], list[float]],
    headline: set[tuple[str, int]],
    seeds: Sequence[int],
    extra: dict[str, Any],
    runs_dir: Path,
    quick: bool,
    script: str,
    jobs: int = 1,
) -> list[dict[str, Any]]:
    """Phase 1 (every learning rate at seed 0) and phase 2 (the chosen rate of the
    headline configurations at the other seeds); ``jobs`` runs at a time."""

    def run_all(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            return list(pool.map(lambda s: run_cached(s, runs_dir, quick, script), specs))

    print("phase 1: learning-rate sweep (seed 0, chosen on validation)", flush=True)
    results = run_all(
        [
            {"method": method, "variant": variant, "lr": lr, "seed": 0, **extra}
            for (method, variant), lrs in sweep.items()
            for lr in lrs
        ]
    )
    print("phase 2: the chosen learning rates with more seeds", flush=True)
    more = [
        {"method": method, "variant": variant, "lr": lr, "seed": seed, **extra}
        for (method, variant), lr in select(results).items()
        if (method, variant) in headline and not quick
        for seed in seeds[1:]
    ]
    return results + run_all(more)


def plot(
    summary: dict[str, Any],
    path: Path,
    styles: dict[str, tuple[str, str, str]],
    baseline: tuple[str, str],
    labels: tuple[str, str, str],
) -> None:
    """Accuracy against trainable parameters (log scale), one line per method in
    ``styles`` (method -> name, marker, colour); the ``baseline`` method (method, name)
    as a dashed line; ``labels`` = (x label, y label, title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for method, (name, marker, color) in styles.items():
        rows = sorted(
            (r for r in summary["rows"] if r["method"] == method),
            key=lambda r: r["trainable_adapter"],
        )
        if rows:
            ax.errorbar(
                [r["trainable_adapter"] for r in rows],
                [r["mean"] for r in rows],
                yerr=[r["std"] for r in rows],
                marker=marker,
                color=color,
                label=name,
                capsize=3,
                linestyle="-" if len(rows) > 1 else "none",
            )
    base = [r for r in summary["rows"] if r["method"] == baseline[0]]
    if base:
        mean = base[0]["mean"]
        ax.axhline(mean, color="grey", linestyle="--", label=f"{baseline[1]} ({mean:.3f})")
    ax.set_xscale("log")
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(labels[2])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
