"""The comparison driver of examples/compare.py and examples/compare_llm.py: the learning
rate is chosen on validation at seed 0, and the table reports the test metric over the
seeds run at that rate."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from compare_common import select, summarize, table


def _run(
    method: str, variant: int, lr: float, seed: int, val: float, test: float
) -> dict[str, Any]:
    return {
        "method": method, "variant": variant, "lr": lr, "seed": seed, "val_accuracy": val,
        "test_accuracy": test, "trainable_adapter": variant * 10, "trainable_head": 0,
        "adapter_bytes": 100, "seconds_per_step": 0.5, "peak_rss_mb": 10.0,
    }  # fmt: skip


RUNS = [
    _run("ours", 4, 1e-2, 0, 0.70, 0.99),  # the best test score, but not chosen
    _run("ours", 4, 2e-2, 0, 0.80, 0.81),
    _run("ours", 4, 5e-2, 0, 0.80, 0.50),  # a tie on validation: the smaller rate wins
    _run("ours", 4, 2e-2, 1, 0.10, 0.83),  # other seeds never choose
    _run("ours", 4, 2e-2, 2, 0.10, 0.85),
    _run("lora", 2, 1e-3, 0, 0.60, 0.60),
]


def test_the_rate_is_chosen_on_validation_at_seed_0() -> None:
    assert select(RUNS) == {("ours", 4): 2e-2, ("lora", 2): 1e-3}


def test_summary_reports_the_seeds_at_the_chosen_rate() -> None:
    summary = summarize(RUNS, {"ours d=4": 0.25}, lambda m, v: f"{m} d={v}", ["ours", "lora"])
    ours, lora = summary["rows"]
    assert ours["seeds"] == [0, 1, 2] and ours["test_accuracy"] == [0.81, 0.83, 0.85]
    assert ours["mean"] == statistics.mean([0.81, 0.83, 0.85])
    assert ours["std"] == statistics.stdev([0.81, 0.83, 0.85])
    assert ours["val_accuracy_by_lr"] == {"0.01": 0.70, "0.02": 0.80, "0.05": 0.80}
    assert lora["seeds"] == [0] and lora["std"] == 0.0
    text = table(summary)
    assert "| ours d=4 | 0.8300 ± 0.0200 | 3 | 0.02 |" in text and "| 0.250 |" in text
