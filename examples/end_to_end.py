"""End to end: train a Uni-LoRA adapter, save it, merge it offline, export it to LoRA.

Runs on the CPU in well under a minute, with a small Llama-shaped model built from a
config (no download):

1. base model -> ``save_pretrained`` (safetensors), the "checkpoint on disk";
2. ``get_unilora_model`` on all linear layers; train ``theta_d`` alone to copy a
   shifted token sequence (the loss falls);
3. ``save_pretrained`` the adapter (a few KB: ``theta_d`` + config);
4. ``unilora_rs.merge`` (Rust, no torch) streams the adapter into the checkpoint; the
   merged checkpoint, loaded by transformers, gives the adapted model's logits;
5. ``unilora_rs.export_lora`` writes a standard PEFT LoRA adapter, loaded by PEFT,
   which gives the same logits again.

    python examples/end_to_end.py [--steps 60] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import transformers
import unilora_rs as ur
from unilora_rs.torch import UniLoRAConfig, get_unilora_model

VOCAB = 96


def build_base(seed: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def batch(gen: torch.Generator, size: int = 16, length: int = 24) -> torch.Tensor:
    """Sequences whose next token is the current one plus 1 (mod VOCAB)."""
    start = torch.randint(0, VOCAB, (size, 1), generator=gen)
    return (start + torch.arange(length)) % VOCAB


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="unilora-e2e-"))
    work.mkdir(parents=True, exist_ok=True)

    base_dir = work / "base"
    build_base(0).save_pretrained(base_dir)

    model = get_unilora_model(
        build_base(0),
        UniLoRAConfig(rank=4, vector_length=4096, target_modules="all-linear", seed=7),
    )
    model.print_trainable_parameters()
    opt = torch.optim.AdamW([model.theta_d], lr=2e-2)
    gen = torch.Generator().manual_seed(0)
    model.train()
    losses = []
    for step in range(args.steps):
        ids = batch(gen)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        if step % 20 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {losses[-1]:.3f}")
    model.eval()

    adapter_dir = work / "adapter"
    model.save_pretrained(adapter_dir)
    size = sum(f.stat().st_size for f in adapter_dir.iterdir())
    print(f"adapter saved: {adapter_dir} ({size / 1024:.1f} KiB)")

    probe = batch(torch.Generator().manual_seed(1), size=4)
    with torch.no_grad():
        ours = model(input_ids=probe).logits

    merged_dir = work / "merged"
    result = ur.merge(base_dir, adapter_dir, merged_dir, overwrite=True)
    print(f"merged {len(result.merged)} tensors into {merged_dir}")
    merged = transformers.LlamaForCausalLM.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        d_merge = max_diff(merged(input_ids=probe).logits, ours)
    print(f"merged checkpoint vs Uni-LoRA model: max |logit diff| = {d_merge:.2e}")

    import peft

    lora_dir = work / "lora"
    ur.export_lora(adapter_dir, lora_dir, overwrite=True)
    lora = peft.PeftModel.from_pretrained(build_base(0), lora_dir).eval()
    with torch.no_grad():
        d_lora = max_diff(lora(input_ids=probe).logits, ours)
    print(f"PEFT LoRA export vs Uni-LoRA model:  max |logit diff| = {d_lora:.2e}")

    ok = losses[-1] < losses[0] and d_merge < 1e-4 and d_lora < 1e-4
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
