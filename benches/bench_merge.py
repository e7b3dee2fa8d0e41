"""Benchmark of ``unilora merge`` on a Llama-shaped bf16 checkpoint.

Generates (under a temporary folder) a Llama-7B-shaped bf16 checkpoint of at least
2 GB in several shards (hidden 4096, MLP 11008, vocab 32000; ``--layers`` decoder
layers), a Uni-LoRA adapter on every linear layer of every decoder layer, then measures
in one run, each in its own child process (so that peak RSS is that process's own):

* ``cp -r`` of the checkpoint (the physical limit of reading + writing the bytes),
  and the same followed by an ``fsync`` of every copied file;
* ``unilora merge`` (the CLI, fsync on, as shipped) and the same merge without fsync;
* PEFT's path: transformers loads the base in bf16, ``PeftModel.from_pretrained`` on
  the exact LoRA export of the adapter, ``merge_and_unload()``, ``save_pretrained()``.

Caching: page caches cannot be dropped here, so every file is read once before the
measurements (warm cache for every contender); before each run the previous output is
deleted and ``sync`` flushes pending writeback. ``cp`` and the merge run in ``--repeat``
rounds, each round running every contender once, so that a change of load from other
work on the machine hits them alike; the ratios are the medians of the per-round
ratios, the times the medians of the runs (all printed). The PEFT path runs once.
Peak RSS is measured by ``/usr/bin/time`` for each child.

    python benches/bench_merge.py            # 4 layers: 2.2 GB, 3 shards
    python benches/bench_merge.py --layers 8 --keep
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np

HIDDEN, INTER, VOCAB = 4096, 11008, 32000
LINEARS = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (HIDDEN, INTER),
    "mlp.up_proj": (HIDDEN, INTER),
    "mlp.down_proj": (INTER, HIDDEN),
}

PEFT_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, lora, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, lora)
model = model.merge_and_unload()
model.save_pretrained(out)
"""

NO_FSYNC_SCRIPT = """
import sys
from unilora_rs import _core
r = _core.merge(sys.argv[1], sys.argv[2], sys.argv[3], fsync=False)
print(len(r.merged))
"""

FSYNC_SCRIPT = """
import os, sys
for root, _, files in os.walk(sys.argv[1]):
    for f in files:
        fd = os.open(os.path.join(root, f), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
"""


def tensor_specs(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for layer in range(layers):
        p = f"model.layers.{layer}"
        for name, (fin, fout) in LINEARS.items():
            specs.append((f"{p}.{name}.weight", (fout, fin)))
        specs.append((f"{p}.input_layernorm.weight", (HIDDEN,)))
        specs.append((f"{p}.post_attention_layernorm.weight", (HIDDEN,)))
    specs.append(("model.norm.weight", (HIDDEN,)))
    specs.append(("lm_head.weight", (VOCAB, HIDDEN)))
    return specs


def generate_checkpoint(path: Path, layers: int, max_shard: int) -> tuple[int, int]:
    """Writes the bf16 checkpoint folder; returns (total bytes, largest tensor bytes)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensor_specs(layers):
        nbytes = 2 * int(np.prod(shape))
        if groups[-1] and size + nbytes > max_shard:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    weight_map: dict[str, str] = {}
    total = largest = 0
    for k, group in enumerate(groups):
        shard = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            if len(shape) == 1:
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
            tensors[name] = t
            weight_map[name] = shard
            total += t.numel() * 2
            largest = max(largest, t.numel() * 2)
        save_file(tensors, str(path / shard), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    config.save_pretrained(path)
    return total, largest


def make_adapter(path: Path, layers: int, rank: int, d: int) -> None:
    from unilora_rs.adapter import AdapterConfig, ModuleSpec, save_adapter

    modules = [
        ModuleSpec(f"model.layers.{layer}.{name}", fin, fout)
        for layer in range(layers)
        for name, (fin, fout) in LINEARS.items()
    ]
    config = AdapterConfig(seed=1, vector_length=d, rank=rank, alpha=2.0 * rank, modules=modules)
    theta = np.random.default_rng(0).uniform(-0.02, 0.02, d).astype(np.float32)
    save_adapter(path, config, theta)


TIME = shutil.which("time", path="/usr/bin:/bin")


def run_child(argv: list[str]) -> tuple[float, int, str]:
    """Runs ``argv``; returns (wall seconds, peak RSS bytes or -1, stdout).

    Peak RSS is measured by ``/usr/bin/time`` (its child starts from a small process;
    on Linux a child's ``ru_maxrss`` would otherwise start at this Python process's
    own high-water mark, which survives ``fork`` + ``exec``)."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss_file:
        cmd = [TIME, "-f", "%M", "-o", rss_file.name, *argv] if TIME else argv
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{argv[:3]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        text = rss_file.read().strip().splitlines()
    rss = int(text[-1]) * 1024 if TIME and text else -1
    return wall, rss, proc.stdout


def warm(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with p.open("rb") as fh:
                while fh.read(64 << 20):
                    pass


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (4: 2.2 GB)")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--d", type=int, default=2**18)
    ap.add_argument("--max-shard", type=float, default=1.0, help="shard size in GB")
    ap.add_argument("--workdir", default=None, help="folder for the files (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="runs of cp and merge (median)")
    args = ap.parse_args()

    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_merge_", dir="/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    base, adapter, lora = root / "base", root / "adapter", root / "lora"
    py = sys.executable
    try:
        t0 = time.perf_counter()
        if not base.exists():
            total, largest = generate_checkpoint(base, args.layers, int(args.max_shard * 1e9))
        else:
            from safetensors import safe_open

            total = largest = 0
            for f in base.glob("*.safetensors"):
                with safe_open(str(f), "np") as st:
                    for k in st.keys():  # noqa: SIM118
                        sl = st.get_slice(k)
                        n = 2 * int(np.prod(sl.get_shape()))
                        total, largest = total + n, max(largest, n)
        if not adapter.exists():
            make_adapter(adapter, args.layers, args.rank, args.d)
        shards = len(list(base.glob("*.safetensors")))
        print(
            f"checkpoint: {gb(total)} bf16 in {shards} shards, {args.layers} layers, "
            f"largest tensor {gb(largest)} (prepared in {time.perf_counter() - t0:.1f} s)"
        )
        print(
            f"adapter: rank {args.rank}, d = {args.d}, {7 * args.layers} modules; "
            f"threads: {os.cpu_count()} CPUs; workdir {root}"
        )
        warm(base)

        out = root / "out"

        def once(argv: list[str]) -> tuple[float, int, str]:
            shutil.rmtree(out, ignore_errors=True)
            os.sync()  # no writeback of an earlier step's output during this one
            return run_child(argv)

        cp = "cp -r"
        cp_sync = "cp -r + fsync"
        cli = "unilora merge (CLI, fsync)"
        no_fsync = "unilora merge (no fsync)"
        runs: dict[str, list[tuple[float, int]]] = {cp: [], cp_sync: [], cli: [], no_fsync: []}
        for _ in range(args.repeat):
            t_cp, rss_cp, _ = once(["cp", "-r", str(base), str(out)])
            t_sync, rss_sync, _ = run_child([py, "-c", FSYNC_SCRIPT, str(out)])
            runs[cp].append((t_cp, rss_cp))
            runs[cp_sync].append((t_cp + t_sync, max(rss_cp, rss_sync)))
            argv = [py, "-m", "unilora_rs", "merge", str(base), str(adapter), str(out)]
            runs[cli].append(once([*argv, "--no-progress"])[:2])
            runs[no_fsync].append(once([py, "-c", NO_FSYNC_SCRIPT, *argv[4:]])[:2])
        rows: list[tuple[str, float, int]] = []
        for label, rs in runs.items():
            wall, rss = median([w for w, _ in rs]), max(r for _, r in rs)
            rows.append((label, wall, rss))
            spread = ", ".join(f"{w:.2f}" for w, _ in rs)
            print(f"  {label:<44} {wall:8.2f} s  peak RSS {rss / 2**20:8.1f} MiB  (runs {spread})")

        def ratio(a: str, b: str) -> tuple[float, str]:
            per_round = [x[0] / y[0] for x, y in zip(runs[a], runs[b], strict=True)]
            return median(per_round), ", ".join(f"{r:.2f}" for r in per_round)

        ours = root / "ours"
        shutil.rmtree(ours, ignore_errors=True)
        shutil.move(out, ours)
        if not args.skip_peft:
            shutil.rmtree(lora, ignore_errors=True)
            t_exp, _, _ = run_child(
                [py, "-m", "unilora_rs", "export-lora", str(adapter), str(lora)]
            )
            print(f"  (export-lora for the PEFT path: {t_exp:.2f} s, not counted)")
            peft = "PEFT merge_and_unload + save_pretrained"
            t_peft, rss_peft, _ = once([py, "-c", PEFT_SCRIPT, str(base), str(lora), str(out)])
            rows.append((peft, t_peft, rss_peft))
            print(f"  {peft:<44} {t_peft:8.2f} s  peak RSS {rss_peft / 2**20:8.1f} MiB")
            compare(ours, out)
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(ours, ignore_errors=True)

        by = {label: (wall, rss) for label, wall, rss in rows}
        t_cp = by[cp][0]
        t_ours, rss_ours = by[cli]
        budget = 2 * largest + 256 * 2**20
        print()
        print("| step | time (s) | vs cp -r | peak RSS (MiB) |")
        print("| --- | ---: | ---: | ---: |")
        for label, wall, rss in rows:
            print(f"| {label} | {wall:.2f} | {wall / t_cp:.2f}x | {rss / 2**20:.0f} |")
        print()
        for a, b in ((cli, cp_sync), (no_fsync, cp)):
            r, per_round = ratio(a, b)
            print(f"{a} / {b}: {r:.2f}x (target <= 1.5x; per round {per_round})")
        if not args.skip_peft:
            print(
                f"PEFT path / merge:               {t_peft / t_ours:.2f}x faster (target >= 3x); "
                f"peak RSS {rss_peft / rss_ours:.1f}x ours"
            )
        print(
            f"peak RSS of merge: {rss_ours / 2**20:.0f} MiB; budget 2 x largest tensor + 256 MiB = "
            f"{budget / 2**20:.0f} MiB ({'met' if rss_ours < budget else 'MISSED'})"
        )
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


def compare(ours: Path, peft_out: Path) -> None:
    """Largest difference between our merged weights and PEFT's, in bf16 ULPs."""
    import torch
    from safetensors import safe_open

    def ordered(t: torch.Tensor) -> torch.Tensor:
        i = t.view(torch.int16).int()
        return torch.where(i < 0, -(i & 0x7FFF), i)

    theirs: dict[str, Path] = {}
    for f in peft_out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118
                theirs[k] = f
    worst = 0
    checked = 0
    for f in sorted(ours.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118
                if "layers.0." not in k or k not in theirs:
                    continue
                a = ordered(st.get_tensor(k))
                with safe_open(str(theirs[k]), "pt") as st2:
                    b = ordered(st2.get_tensor(k))
                worst = max(worst, int((a - b).abs().max()))
                checked += 1
    print(
        f"  ours vs PEFT's merged layer 0 ({checked} tensors): max difference {worst} bf16 ULP "
        "(PEFT rounds B@A to bf16 before adding it: one extra rounding)"
    )


if __name__ == "__main__":
    raise SystemExit(main())
