"""Benchmarks of several adapters, each against its alternative in the same run.

* ``mixed``: a batch of 8 rows over 8 adapters (``model(x, adapter_names=...)``) against
  8 separate calls (``set_adapter`` + a one-row forward), on a Llama-shaped model.
* ``generate``: tokens/s of greedy ``generate()`` with the theta_D cache (rebuilt only
  when theta_d changes), without it (``inference_cache = False``: one rebuild per
  token), PEFT's Uni-LoRA (``theta_d[indices] * scales`` per layer per token) and the
  base model alone, same model, same adapter size.
* ``merge``: 4 adapters merged into one checkpoint each, in one pass over the base
  (``merge_each``) against 4 separate merges: seconds and bytes of tensor data read.

Times are medians of ``--repeat`` rounds; every round runs each contender once, so a
change of load from other work on the machine hits them alike.

    python benches/bench_multi.py                 # all three
    python benches/bench_multi.py mixed generate
    python benches/bench_multi.py merge --merge-layers 8
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np


def _llama(args: argparse.Namespace, seed: int = 0) -> Any:
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _ours(args: argparse.Namespace, n: int) -> Any:
    import torch
    from unilora_rs.torch import UniLoRAConfig, get_unilora_model

    def cfg(seed: int) -> UniLoRAConfig:
        return UniLoRAConfig(
            rank=args.rank, vector_length=args.d, seed=seed, target_modules="all-linear"
        )

    model = get_unilora_model(_llama(args), cfg(0), adapter_name="a0")
    for k in range(1, n):
        model.add_adapter(f"a{k}", cfg(k))
    with torch.no_grad():
        for k in range(n):
            model.get_theta_d(f"a{k}").uniform_(-0.05, 0.05)
    return model.eval()


def _rounds(contenders: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for fn in contenders.values():  # warm-up
        fn()
    for _ in range(repeat):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: median(ts) for name, ts in times.items()}


def bench_mixed(args: argparse.Namespace) -> None:
    import torch

    n = 8
    model = _ours(args, n)
    names = [f"a{k}" for k in range(n)]
    x = torch.randint(3, args.vocab, (n, args.seq), generator=torch.Generator().manual_seed(1))

    def mixed() -> object:
        with torch.no_grad():
            return model(x, adapter_names=names).logits

    def separate() -> object:
        out = []
        with torch.no_grad():
            for k, name in enumerate(names):
                model.set_adapter(name)
                out.append(model(x[k : k + 1]).logits)
        return torch.cat(out)

    err = (mixed() - separate()).abs().max().item()
    t = _rounds({"mixed batch": mixed, "8 separate calls": separate}, args.repeat)
    print(f"\n## mixed batch: {n} rows x {args.seq} tokens over {n} adapters")
    print(f"model: Llama-shaped, hidden {args.hidden}, {args.layers} layers, all-linear, ")
    print(f"rank {args.rank}, d {args.d}; torch threads {torch.get_num_threads()}")
    print("| contender | ms | ratio |\n| --- | ---: | ---: |")
    for name, sec in t.items():
        print(f"| {name} | {1e3 * sec:.1f} | {sec / t['mixed batch']:.2f}x |")
    print(f"max |mixed - separate| = {err:.2e}")


def bench_generate(args: argparse.Namespace) -> None:
    import peft
    import torch

    x = torch.randint(
        3, args.vocab, (args.gen_batch, 8), generator=torch.Generator().manual_seed(2)
    )
    kw: dict[str, Any] = {
        "max_new_tokens": args.new_tokens,
        "do_sample": False,
        "pad_token_id": 0,
        "min_new_tokens": args.new_tokens,
    }
    ours = _ours(args, 1)
    theirs = peft.get_peft_model(
        _llama(args),
        peft.UniLoraConfig(r=args.rank, theta_d_length=args.d, target_modules="all-linear"),
    ).eval()
    base = _llama(args)

    def run(model: Any, cache: bool | None = None) -> Callable[[], object]:
        def go() -> object:
            if cache is not None:
                model.inference_cache = cache
            with torch.no_grad():
                return model.generate(input_ids=x, **kw)

        return go

    state = ours._adapters["a0"].state
    state.rebuilds = 0
    run(ours, True)()
    cached_rebuilds = state.rebuilds
    state.rebuilds = 0
    run(ours, False)()
    uncached_rebuilds = state.rebuilds
    same = bool(torch.equal(run(ours, True)(), run(ours, False)()))  # type: ignore[arg-type]
    t = _rounds(
        {
            "ours, theta_D cached": run(ours, True),
            "ours, rebuilt per token": run(ours, False),
            "PEFT Uni-LoRA": run(theirs),
            "base model, no adapter": run(base),
        },
        args.repeat,
    )
    tokens = args.gen_batch * args.new_tokens
    print(f"\n## generate: batch {args.gen_batch}, {args.new_tokens} new tokens, greedy")
    print(f"model: Llama-shaped, hidden {args.hidden}, {args.layers} layers, all-linear, ")
    print(f"rank {args.rank}, d {args.d}, D {ours.total_size:,}")
    print("| contender | tokens/s | vs cached |\n| --- | ---: | ---: |")
    for name, sec in t.items():
        print(f"| {name} | {tokens / sec:.0f} | {t['ours, theta_D cached'] / sec:.2f}x |")
    print(
        f"rebuilds per generate(): {cached_rebuilds} cached, {uncached_rebuilds} uncached; "
        f"outputs equal: {same}"
    )


def _write_base(folder: Path, layers: int, hidden: int, inter: int) -> int:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    total = 0
    per_shard = max(1, layers // 2)
    weight_map = {}
    shards = -(-layers // per_shard)
    for s in range(shards):
        sd = {}
        for layer in range(s * per_shard, min(layers, (s + 1) * per_shard)):
            for name, (fin, fout) in _linears(hidden, inter).items():
                sd[f"model.layers.{layer}.{name}.weight"] = (
                    torch.randn(fout, fin, generator=g) * 0.02
                ).to(torch.bfloat16)
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(sd, str(folder / fname), metadata={"format": "pt"})
        for k, v in sd.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    import json

    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return total


def _linears(hidden: int, inter: int) -> dict[str, tuple[int, int]]:
    return {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (hidden, hidden),
        "self_attn.v_proj": (hidden, hidden),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (hidden, inter),
        "mlp.up_proj": (hidden, inter),
        "mlp.down_proj": (inter, hidden),
    }


def bench_merge(args: argparse.Namespace) -> None:
    import unilora_rs as ur
    from unilora_rs.adapter import AdapterConfig, ModuleSpec, save_adapter

    n = 4
    tmp = Path(tempfile.mkdtemp(prefix="bench-multi-", dir=args.tmp))
    try:
        hidden, inter = args.merge_hidden, int(args.merge_hidden * 2.6875)
        nbytes = _write_base(tmp / "base", args.merge_layers, hidden, inter)
        modules = [
            ModuleSpec(f"model.layers.{layer}.{name}", fin, fout)
            for layer in range(args.merge_layers)
            for name, (fin, fout) in _linears(hidden, inter).items()
        ]
        adapters = []
        for k in range(n):
            config = AdapterConfig(seed=k, vector_length=2**16, rank=4, alpha=4.0, modules=modules)
            theta = np.random.default_rng(k).uniform(-0.02, 0.02, 2**16).astype(np.float32)
            adapters.append(save_adapter(tmp / f"ad{k}", config, theta))
        for f in sorted((tmp / "base").iterdir()):  # warm cache for both contenders
            f.read_bytes()
        read: dict[str, int] = {}

        def one_pass() -> object:
            shutil.rmtree(tmp / "each", ignore_errors=True)
            os.sync()
            result = ur.merge_each(tmp / "base", adapters, tmp / "each")
            read["one pass"] = result.bytes_read
            return result

        def separate() -> object:
            shutil.rmtree(tmp / "sep", ignore_errors=True)
            os.sync()
            read["4 separate merges"] = sum(
                ur.merge(tmp / "base", a, tmp / "sep" / a.name).bytes_read for a in adapters
            )
            return None

        t = _rounds({"one pass": one_pass, "4 separate merges": separate}, args.repeat)
        same = all(
            (tmp / "each" / a.name / f.name).read_bytes() == f.read_bytes()
            for a in adapters
            for f in (tmp / "sep" / a.name).iterdir()
            if f.is_file()
        )
        print(f"\n## merge {n} adapters: bf16 base of {nbytes / 2**20:.0f} MiB")
        print(
            f"({args.merge_layers} layers, hidden {hidden}), every linear layer adapted, fsync on"
        )
        print("| contender | s | vs one pass | tensor bytes read |\n| --- | ---: | ---: | ---: |")
        for name, sec in t.items():
            print(
                f"| {name} | {sec:.2f} | {sec / t['one pass']:.2f}x | "
                f"{read[name] / 2**20:.0f} MiB |"
            )
        print(f"outputs equal byte for byte: {same}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "parts", nargs="*", default=["mixed", "generate", "merge"], help="mixed generate merge"
    )
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--d", type=int, default=8192)
    parser.add_argument("--gen-batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--merge-layers", type=int, default=4)
    parser.add_argument("--merge-hidden", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--tmp", default=None, help="folder for the merge checkpoints")
    args = parser.parse_args()
    for part in args.parts:
        {"mixed": bench_mixed, "generate": bench_generate, "merge": bench_merge}[part](args)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
