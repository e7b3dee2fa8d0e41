"""``unilora bench``: build a projection and reconstruct a Llama-7B-shaped adapter."""

from __future__ import annotations

import argparse
import time

import numpy as np

from ..errors import InvalidArgumentError
from ..numpy_api import fingerprint, get_num_threads, projection, reconstruct, total_size

# Llama-2-7B: 32 decoder layers, hidden 4096, MLP 11008; all linear layers adapted.
LLAMA_7B = {
    "q_proj": (4096, 4096),
    "k_proj": (4096, 4096),
    "v_proj": (4096, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (4096, 11008),
    "up_proj": (4096, 11008),
    "down_proj": (11008, 4096),
}


def llama_shapes(layers: int, rank: int) -> dict[str, tuple[int, int]]:
    """LoRA matrix shapes of a Llama-7B-shaped model, in flattening order (B then A)."""
    shapes: dict[str, tuple[int, int]] = {}
    for layer in range(layers):
        for name, (fan_in, fan_out) in LLAMA_7B.items():
            kind = "mlp" if name.endswith(("gate_proj", "up_proj", "down_proj")) else "self_attn"
            prefix = f"model.layers.{layer}.{kind}.{name}"
            shapes[f"{prefix}.lora_B"] = (fan_out, rank)
            shapes[f"{prefix}.lora_A"] = (rank, fan_in)
    return shapes


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "bench", help="reconstruct a Llama-7B-shaped adapter (synthetic) and print timings"
    )
    p.add_argument("--rank", type=int, default=4, help="LoRA rank r (default 4)")
    p.add_argument("--d", type=int, default=2**19, help="trainable vector length (default 2^19)")
    p.add_argument("--layers", type=int, default=32, help="decoder layers (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run)


def _mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"


def run(args: argparse.Namespace) -> int:
    for name in ("rank", "d", "layers"):
        if getattr(args, name) < 1:
            raise InvalidArgumentError(f"--{name} must be at least 1, got {getattr(args, name)}")
    shapes = llama_shapes(args.layers, args.rank)
    if args.d > total_size(shapes):
        raise InvalidArgumentError(
            f"--d {args.d} is larger than the adapter's {total_size(shapes):,} LoRA parameters"
        )
    big_d = total_size(shapes)
    theta = np.random.default_rng(args.seed).uniform(-0.02, 0.02, args.d).astype(np.float32)
    print(f"Llama-7B-shaped adapter: {args.layers} layers x 7 linear modules, rank {args.rank}")
    print(f"  matrices              {len(shapes):>14,}")
    print(f"  LoRA parameters D     {big_d:>14,}   ({_mb(4 * big_d)} as float32 LoRA)")
    print(f"  trainable d           {args.d:>14,}   ({_mb(4 * args.d)} adapter vector)")
    print(f"  compression D/d       {big_d / args.d:>14,.1f}x")
    print(f"  threads               {get_num_threads():>14}")

    t0 = time.perf_counter()
    idx, scale = projection(args.seed, big_d, args.d)
    t_map = time.perf_counter() - t0
    counts = np.bincount(idx, minlength=args.d)
    print(
        f"projection map (explicit, for inspection): {t_map * 1e3:8.1f} ms; "
        f"column use {counts.min()}..{counts.max()} (balanced)"
    )

    t0 = time.perf_counter()
    mats = reconstruct(theta, args.seed, shapes)
    t_rec = time.perf_counter() - t0
    print(
        f"reconstruct (no index memory):             {t_rec * 1e3:8.1f} ms "
        f"= {big_d / t_rec / 1e9:.2f} G params/s"
    )

    flat = np.concatenate([m.ravel() for m in mats.values()])
    exact = np.array_equal(flat, theta[idx] * scale)
    norm_ratio = float(
        np.linalg.norm(flat.astype(np.float64)) / np.linalg.norm(theta.astype(np.float64))
    )
    print(f"equals theta_d[idx] * scale bit for bit:   {exact}")
    print(f"isometry ||theta_D|| / ||theta_d||:         {norm_ratio:.9f}")
    print(f"fingerprint: {fingerprint(args.seed, args.d, shapes)}")
    return 0 if exact and abs(norm_ratio - 1.0) < 1e-5 else 1
