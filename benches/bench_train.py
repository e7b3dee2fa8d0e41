"""Training-step time and memory: unilora_rs.torch vs PEFT LoRA and PEFT Uni-LoRA.

Every variant trains the same Llama-shaped model (built from a config, random weights)
with the same rank and target modules. Step times (forward + backward + AdamW step) are
taken in one process with the variants' steps interleaved, so that machine noise hits
all alike; peak memory is measured with each variant alone in a subprocess. Printed:
median step time, ratios against PEFT LoRA and PEFT Uni-LoRA from the same run, peak
memory, and the bytes of index tensors each adapter keeps.

    python benches/bench_train.py                  # CPU; --out FILE also writes the table
    python benches/bench_train.py --device cuda --hidden 2048 --layers 8 --seq 512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

VARIANTS = ("peft-lora", "peft-unilora", "ours-on-the-fly", "ours-cached")


def _build(args: argparse.Namespace, variant: str) -> tuple[Any, int]:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.6875) // 8 * 8,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=max(args.seq, 128),
    )
    dtype = getattr(torch, args.dtype)
    model = transformers.LlamaForCausalLM(cfg).to(device=args.device, dtype=dtype)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if variant == "peft-lora":
        import peft

        pc = peft.LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=targets)
        model = peft.get_peft_model(model, pc)
    elif variant == "peft-unilora":
        import peft

        pc = peft.UniLoraConfig(r=args.rank, theta_d_length=args.d, target_modules=targets)
        model = peft.get_peft_model(model, pc)
    else:
        from unilora_rs.torch import UniLoRAConfig, get_unilora_model

        mode = "cached" if variant == "ours-cached" else "on_the_fly"
        uc = UniLoRAConfig(
            rank=args.rank, vector_length=args.d, target_modules=targets, index_mode=mode
        )
        model = get_unilora_model(model, uc)
    index_bytes = 0
    for name, buf in model.named_buffers():
        if not buf.dtype.is_floating_point and ("indices" in name or "index" in name):
            index_bytes += buf.numel() * buf.element_size()
    cached = getattr(model, "_index_map", None)
    if cached is not None:
        index_bytes += cached.numel() * cached.element_size()
    return model, index_bytes


def _stepper(model: Any, args: argparse.Namespace) -> Any:
    import torch

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3)
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(args.device)
    cuda = args.device.startswith("cuda")

    def step() -> float:
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and args.autocast else _Null()
        with ctx:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, sum(p.numel() for p in params)


def run_memory(args: argparse.Namespace) -> dict[str, Any]:
    """One variant alone in this process: peak memory of a few training steps."""
    import torch

    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    model, index_bytes = _build(args, args.variant)
    step, trainable = _stepper(model, args)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        step()
    out = {
        "variant": args.variant,
        "index_bytes": index_bytes,
        "trainable": trainable,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if cuda:
        torch.cuda.synchronize()
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_timing(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """All variants in this process, their steps interleaved (A B C D A B C D ...), so
    that machine noise falls on every variant alike. Returns median / min step ms."""
    import torch

    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    steppers = {}
    for variant in VARIANTS:
        model, _ = _build(args, variant)
        steppers[variant] = _stepper(model, args)[0]
    for _ in range(args.warmup):
        for step in steppers.values():
            step()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    losses: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.steps):
        for variant, step in steppers.items():
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            losses[variant].append(step())
            if cuda:
                torch.cuda.synchronize()
            times[variant].append(time.perf_counter() - t0)
    return {
        v: {
            "step_ms": 1e3 * statistics.median(times[v]),
            "step_ms_min": 1e3 * min(times[v]),
            "loss_first": losses[v][0],
            "loss_last": losses[v][-1],
        }
        for v in VARIANTS
    }


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    ref = {r["variant"]: r for r in results}
    lora = ref["peft-lora"]["step_ms"]
    uni = ref["peft-unilora"]["step_ms"]
    mem_key = "peak_cuda_mb" if "peak_cuda_mb" in results[0] else "peak_rss_mb"
    mem_label = "peak CUDA MiB" if mem_key == "peak_cuda_mb" else "peak RSS MiB"
    lines = [
        f"| variant | step ms (median) | vs PEFT LoRA | vs PEFT Uni-LoRA | {mem_label} "
        "| index tensors | trainable params |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['variant']} | {r['step_ms']:.1f} | {r['step_ms'] / lora:.2f}x "
            f"| {r['step_ms'] / uni:.2f}x | {r[mem_key]:,.0f} "
            f"| {r['index_bytes'] / 2**20:,.2f} MiB | {r['trainable']:,d} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant (internal)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--autocast", action="store_true", help="bf16 autocast on CUDA")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--d", type=int, default=8192)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    parser.add_argument(
        "--out", type=Path, default=None, help="also write the table to this markdown file"
    )
    args = parser.parse_args()

    if args.variant:
        print(json.dumps(run_memory(args)))
        return 0

    forwarded = []
    for key in (
        "device",
        "dtype",
        "hidden",
        "layers",
        "vocab",
        "batch",
        "seq",
        "rank",
        "d",
        "warmup",
        "steps",
        "threads",
    ):
        forwarded += [f"--{key}", str(getattr(args, key))]
    if args.autocast:
        forwarded.append("--autocast")
    results = []
    for variant in VARIANTS:  # memory: one process per variant
        cmd = [sys.executable, __file__, "--variant", variant, *forwarded]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            return 1
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    timing = run_timing(args)
    for r in results:
        r.update(timing[r["variant"]])
    import torch

    device = args.device
    if device.startswith("cuda"):
        device = f"{device} ({torch.cuda.get_device_name()})"
    precision = args.dtype + (" + bf16 autocast" if args.autocast else "")
    header = (
        f"Llama-shaped model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
        f"batch {args.batch} x seq {args.seq}, {precision}; "
        f"all 7 linear projections, rank {args.rank}, d = {args.d}; AdamW. Step time: "
        f"median of {args.steps} steps per variant after {args.warmup} warm-up, the four "
        "variants' steps interleaved in one process; memory: each variant alone in a "
        "subprocess. "
        f"Device {device}, torch {torch.__version__}, {args.threads} threads, "
        f"{platform.processor() or platform.machine()}."
    )
    table = _table(results, args)
    print(header)
    print()
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# Training step benchmark\n\n{header}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
