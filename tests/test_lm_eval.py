"""lm-evaluation-harness scores a merged `unilora train --task sft` model on the
repository's local task (examples/lm_eval/unilora_sentiment.yaml, no Hub) and agrees,
prompt by prompt, with `unilora train`'s own greedy generation."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("lm_eval")
pytest.importorskip("gguf")

import unilora_rs as ur  # noqa: E402
from unilora_rs.datasets import packaged_llm_gguf  # noqa: E402
from unilora_rs.torch.training import exact_match  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")


def _example() -> Any:
    spec = importlib.util.spec_from_file_location(
        "lm_eval_check", ROOT / "examples/lm_eval_check.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _chat(text: str, answer: str) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": f"Positive or negative? {text}"},
            {"role": "assistant", "content": answer},
        ]
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo-shaped folder: a tiny Llama (SmolLM2's tokenizer) trained a few steps,
    its adapter merged by the Rust merge."""
    tmp = tmp_path_factory.mktemp("lm-eval")
    gguf = packaged_llm_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, initializer_range=0.3,
    )  # fmt: skip
    base = tmp / "base"
    transformers.LlamaForCausalLM(cfg).save_pretrained(base)
    tok.save_pretrained(base)
    run = tmp / "unilora-demo-llm"
    data = run / "data"
    data.mkdir(parents=True)
    words = ["good", "bad", "dull", "great", "fine", "poor", "fun", "slow"]
    rows = [_chat(f"a {w} film", "positive" if i % 2 else "negative") for i, w in enumerate(words)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 3))
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = subprocess.run(
        [sys.executable, "-m", "unilora_rs", "train", "--task", "sft", "--model", str(base),
         "--data", str(data / "train.jsonl"), "--eval-data", str(data / "test.jsonl"),
         "--out", str(run / "adapter"), "--max-steps", "2", "--batch-size", "4",
         "--no-progress", "--lr", "0.2", "--max-new-tokens", "8"],  # the task's max_gen_toks
        capture_output=True, text=True, env=ENV, timeout=900, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Half the references become the model's own answers, so that exact match is 0.5
    # whatever a random model says; both evaluators must find exactly those.
    samples = [json.loads(x) for x in (run / "adapter/eval_samples.jsonl").read_text().splitlines()]
    for s in samples:
        if s["row"] % 2 == 0 and s["generated"] and not exact_match(s["generated"], s["reference"]):
            rows[s["row"]]["messages"][1]["content"] = s["generated"]
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ur.merge(base, run / "adapter", run / "merged")
    return run


def _ours(run: Path) -> tuple[list[dict[str, Any]], float]:
    """Our samples (by row) and their exact match against the test file's references."""
    samples = [json.loads(x) for x in (run / "adapter/eval_samples.jsonl").read_text().splitlines()]
    samples.sort(key=lambda s: s["row"])
    rows = [json.loads(x) for x in (run / "data/test.jsonl").read_text().splitlines()]
    refs = [r["messages"][1]["content"] for r in rows]
    hits = sum(exact_match(s["generated"], ref) for s, ref in zip(samples, refs, strict=True))
    return samples, hits / len(samples)


def test_lm_eval_agrees_with_our_generation(run: Path) -> None:
    lm = _example().run_lm_eval(run / "merged", run / "data" / "test.jsonl", batch_size=4)
    samples, ours = _ours(run)
    assert lm["prompts"] == [s["prompt"] for s in samples]  # the same chat-template prompt
    assert [a.strip() for a in lm["answers"]] == [s["generated"] for s in samples]
    assert lm["exact_match"] == pytest.approx(ours)


def test_the_documented_command_runs_the_repository_task(run: Path) -> None:
    """The lm_eval command of docs/TRAINING.md, from the folder holding the run."""
    lm_eval_bin = shutil.which("lm_eval") or str(Path(sys.executable).parent / "lm_eval")
    out = run.parent / "lm-eval-out"
    proc = subprocess.run(
        [lm_eval_bin, "--model", "hf", "--model_args",
         "pretrained=unilora-demo-llm/merged,dtype=float32", "--tasks", "unilora_sentiment",
         "--include_path", str(ROOT / "examples" / "lm_eval"), "--apply_chat_template",
         "--device", "cpu", "--batch_size", "4", "--output_path", str(out)],
        cwd=run.parent, capture_output=True, text=True, env=ENV, timeout=900, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    got = results["results"]["unilora_sentiment"]["exact_match,strip"]
    assert got == pytest.approx(_ours(run)[1])
