"""The torch-free deployment path: inspect an adapter, merge it into the base checkpoint
and export it as a standard LoRA, with numpy and the Rust core only.

This is what an offline export job runs (a CPU machine, no torch installed): the
script asserts at the end that torch was never imported.

    unilora demo                                    # makes unilora-demo/adapter
    python examples/offline_pipeline.py             # packaged base + that adapter
    python examples/offline_pipeline.py --base DIR --adapter DIR --out DIR [--dtype bf16]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import unilora_rs as ur
from unilora_rs.datasets import packaged_model_dir


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--base", type=Path, default=None, help="base model folder or .safetensors")
    ap.add_argument("--adapter", type=Path, default=Path("unilora-demo/adapter"))
    ap.add_argument("--out", type=Path, default=Path("offline-out"))
    ap.add_argument("--dtype", choices=["bf16", "f16", "f32"], default=None)
    ap.add_argument(
        "--saved-modules",
        choices=["error", "keep", "drop", "separate"],
        default="keep",
        help="the adapter's modules_to_save in the LoRA export (default keep: PEFT loads "
        "them; vLLM and llama.cpp need drop or separate)",
    )
    args = ap.parse_args()
    base = args.base or packaged_model_dir()

    info = ur.inspect(args.adapter)
    print(
        f"adapter {args.adapter}: d = {info.d:,}, rank {info.rank}, {info.modules} modules, "
        f"{info.lora_parameters:,} LoRA parameters ({info.compression:.1f}x fewer stored), "
        f"fingerprint {'ok' if info.fingerprint_ok else 'MISMATCH'}"
    )
    if not info.fingerprint_ok:
        return 1

    t0 = time.perf_counter()
    merged = ur.merge(base, args.adapter, args.out / "merged", dtype=args.dtype, overwrite=True)
    print(
        f"merged {merged.merged_count} weights into {merged.out} ({_size(merged.out):,} bytes) "
        f"in {time.perf_counter() - t0:.2f} s"
    )

    t0 = time.perf_counter()
    lora = ur.export_lora(
        args.adapter, args.out / "lora", overwrite=True, saved_modules=args.saved_modules
    )
    print(
        f"exported a PEFT LoRA to {lora.out} ({_size(lora.out):,} bytes) "
        f"in {time.perf_counter() - t0:.2f} s"
    )

    leaked = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
    assert not leaked, f"torch was imported: {leaked[:5]}"
    print("torch was never imported: OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
