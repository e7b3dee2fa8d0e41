"""Per-rank memory of a Uni-LoRA run with the base sharded (FSDP2) against replicated (DDP).

    python benches/bench_distributed_memory.py            # 2 CPU processes (gloo)
    python benches/bench_distributed_memory.py --layers 4 --hidden 512 --json out.json

Each configuration runs as 2 processes. Both build a Llama-shaped model on the meta
device, add a Uni-LoRA adapter (``all-linear``, rank 4), then place it: DDP allocates
the whole model on every rank; FSDP2 (``fully_shard`` on the embeddings, each decoder
layer, the output head, the base root, and theta_d alone in the outermost unit)
allocates each rank's shard only. Weights are random (their values do not change the
memory). Then a few AdamW steps on a per-rank batch of ``--batch`` sequences of
``--seq`` tokens.

Reported per rank: the parameter bytes the rank holds after placement (local shards
for FSDP2); the resident set after placement and after wrapping (DDP's construction
broadcasts the module states); the peak resident set during the training steps
(``VmHWM``, reset after wrapping) and of the whole run (``ru_maxrss``); each minus
the resident set measured once the model is built and sharded on the meta device,
before anything is allocated (torch and the libraries, the same in every
configuration).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def _status_mib(key: str) -> float:
    """A line of /proc/self/status in MiB: ``VmRSS`` (resident now) or ``VmHWM`` (the
    peak since the last :func:`_reset_hwm`)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_hwm() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import transformers
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP
    from unilora_rs.torch import UniLoRAConfig, get_unilora_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=args.rank, world_size=2)
    rank = args.rank
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 128),
        max_position_embeddings=args.seq,
    )
    with torch.device("meta"):
        base = transformers.LlamaForCausalLM(cfg).to(dtype)
    model = get_unilora_model(
        base, UniLoRAConfig(rank=4, vector_length=args.d, target_modules="all-linear")
    )
    if args.mode == "fsdp2":
        # The embeddings and the output head are units of their own: in the root unit
        # they would stay gathered for the whole step.
        fully_shard(base.model.embed_tokens)
        for layer in base.model.layers:
            fully_shard(layer)
        fully_shard(base.lm_head)
        fully_shard(base)
        fully_shard(
            model,
            mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32),
        )
    # Everything imported and wrapped, nothing allocated yet (meta): the baseline.
    baseline = _status_mib("VmRSS")
    model.to_empty(device="cpu")
    base.model.rotary_emb = type(base.model.rotary_emb)(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            local.copy_(torch.randn(local.shape, generator=gen) * 0.02)
    held = sum(
        (p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
        for p in model.parameters()
    )
    placed = _status_mib("VmRSS")
    run: Any = DDP(model) if args.mode == "ddp" else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    wrapped = _status_mib("VmRSS")
    _reset_hwm()
    data = torch.Generator().manual_seed(1 + rank)
    for _ in range(args.steps):
        batch = torch.randint(0, args.vocab, (args.batch, args.seq), generator=data)
        run(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    result = {
        "rank": rank,
        "params_held_mib": held / 2**20,
        "rss_after_placement_mib": placed - baseline,
        "rss_wrapped_mib": wrapped - baseline,
        "peak_rss_steps_mib": _status_mib("VmHWM") - baseline,
        "peak_rss_mib": _peak_mib() - baseline,
        "baseline_rss_mib": baseline,
        "base_params": sum(p.numel() for p in base.parameters()),
        "theta_d": args.d,
        "optimizer_state_mib": sum(
            t.numel() * t.element_size()
            for st in opt.state.values()
            for t in st.values()
            if torch.is_tensor(t) and t.dim() > 0
        )
        / 2**20,
    }
    Path(args.result).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def _worker_cmd(mode: str, dtype: str, rank: int, result: Path, common: list[str]) -> list[str]:
    return [
        sys.executable, __file__, "--worker", "--mode", mode, "--dtype", dtype,
        "--rank", str(rank), "--result", str(result), *common,
    ]  # fmt: skip


def launch(args: argparse.Namespace, mode: str, dtype: str) -> list[dict[str, Any]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    if args.mmap_threshold:
        # A fixed glibc mmap threshold: every tensor larger than it is its own mapping,
        # returned to the system when freed, so the resident set follows live memory
        # (with the default dynamic threshold glibc keeps freed blocks in its heap).
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    with tempfile.TemporaryDirectory() as tmp:
        files = [Path(tmp) / f"rank{r}.json" for r in range(2)]
        common = [
            "--layers", str(args.layers), "--hidden", str(args.hidden), "--vocab", str(args.vocab),
            "--seq", str(args.seq), "--batch", str(args.batch), "--steps", str(args.steps),
            "--d", str(args.d),
        ]  # fmt: skip
        procs = [
            subprocess.Popen(_worker_cmd(mode, dtype, r, files[r], common), env=env)
            for r in range(2)
        ]
        for p in procs:
            if p.wait() != 0:
                raise SystemExit(f"{mode}/{dtype}: a rank failed")
        return [json.loads(f.read_text()) for f in files]


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2, help="sequences per rank and step")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--d", type=int, default=2**16)
    ap.add_argument("--dtypes", default="f32,bf16", help="base dtypes to run")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--mmap-threshold", type=int, default=131072, help="glibc mmap threshold; 0: default"
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="ddp", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="f32", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0

    rows = []
    for dtype in args.dtypes.split(","):
        for mode in ("ddp", "fsdp2"):
            ranks = launch(args, mode, dtype)
            rows.append({"mode": mode, "dtype": dtype, "ranks": ranks})
            r0 = ranks[0]
            print(
                f"{mode:6s} base {dtype:4s} {r0['base_params'] / 1e6:.1f} M params: "
                + " | ".join(
                    f"rank {r['rank']}: params {r['params_held_mib']:.0f} MiB, "
                    f"placed {r['rss_after_placement_mib']:.0f} MiB, "
                    f"wrapped {r['rss_wrapped_mib']:.0f} MiB, "
                    f"peak in steps {r['peak_rss_steps_mib']:.0f} MiB, "
                    f"peak {r['peak_rss_mib']:.0f} MiB"
                    for r in ranks
                ),
                flush=True,
            )
    if args.json is not None:
        settings = {
            k: getattr(args, k) for k in ("layers", "hidden", "vocab", "seq", "batch", "steps", "d")
        }
        args.json.write_text(json.dumps({"settings": settings, "runs": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
