"""Merge or export many Uni-LoRA adapters as Ray tasks (no torch anywhere).

    python examples/ray_batch_export.py --base /shared/llama-7b \\
        --adapters /shared/adapters/* --out /shared/merged --kind merge
    python examples/ray_batch_export.py --address auto ...       # an existing Ray cluster

One task per adapter and output kind: ``merge`` (the adapter merged into the base, a
``.safetensors`` file or a sharded model folder like the base) and ``export-lora`` (the
exact PEFT LoRA adapter). Every task reads the base from storage all nodes share and
writes ``OUT/<adapter name>`` (``OUT/<adapter name>-lora`` for exports) through
``unilora_rs.merge`` / ``unilora_rs.export_lora``: both stage the output in a hidden
sibling (``.<name>.unilora-tmp-...``) and rename it into place when complete, so a
reader never sees a partial output. A task whose worker dies (killed, out of memory, a
lost node) is retried by Ray (``--retries``); the retry first removes what the dead
attempt staged. An output that already exists is kept (a rerun skips finished work).

Each task uses the CPUs Ray assigned it for the Rust core's threads (``--cpus-per-task``);
the Rust core releases the GIL and imports no torch. Prints one JSON line per task
(output, worker pid, seconds) and a summary; exits non-zero if a task failed for good.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import ray

KINDS = ("merge", "export-lora")


def output_path(out_dir: Path, adapter: Path, base: Path, kind: str) -> Path:
    """``OUT/<adapter>`` for a merge (``.safetensors`` when the base is one file),
    ``OUT/<adapter>-lora`` for a LoRA export."""
    name = adapter.name
    if kind == "export-lora":
        return out_dir / f"{name}-lora"
    return out_dir / (f"{name}.safetensors" if base.is_file() else name)


def clear_staging(out: Path) -> list[str]:
    """Removes what an earlier, dead attempt staged for ``out`` (its hidden siblings).
    Each output belongs to one task, and Ray starts a retry only after the previous
    attempt's worker is gone, so nothing else writes these paths."""
    removed = []
    for p in out.parent.glob(f".{out.name}.unilora-*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p.name)
    return removed


def run_one(kind: str, base: str, adapter: str, out: str, dtype: str | None) -> dict[str, Any]:
    """The body of one task (also callable without Ray)."""
    import unilora_rs as ur

    cpus = 1
    if ray.is_initialized():
        cpus = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    ur.set_num_threads(cpus)
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    cleared = clear_staging(target)
    t0 = time.perf_counter()
    skipped = target.exists()
    if not skipped:
        if kind == "merge":
            ur.merge(base, adapter, target, dtype=dtype)
        else:
            ur.export_lora(adapter, target)
    return {
        "kind": kind,
        "adapter": adapter,
        "out": str(target),
        "pid": os.getpid(),
        "threads": cpus,
        "skipped": skipped,
        "cleared": cleared,
        "seconds": round(time.perf_counter() - t0, 3),
        "torch_imported": "torch" in sys.modules,
    }


def submit_all(
    base: Path,
    adapters: list[Path],
    out_dir: Path,
    kinds: list[str],
    *,
    dtype: str | None = None,
    cpus_per_task: int = 1,
    retries: int = 3,
) -> list[dict[str, Any]]:
    """Runs every (adapter, kind) as a Ray task and waits for all of them."""
    task = ray.remote(num_cpus=cpus_per_task, max_retries=retries)(run_one)
    refs = [
        task.remote(
            kind,
            str(base),
            str(adapter),
            str(output_path(out_dir, adapter, base, kind)),
            dtype,
        )
        for adapter in adapters
        for kind in kinds
    ]
    results: list[dict[str, Any]] = []
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        for ref in done:
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as err:
                result = {"error": f"{type(err).__name__}: {err}".splitlines()[0]}
            print(json.dumps(result), flush=True)
            results.append(result)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--base", type=Path, required=True, help="base model file or folder")
    ap.add_argument("--adapters", type=Path, nargs="*", default=[], help="adapter folders")
    ap.add_argument("--adapter-list", type=Path, help="a file with one adapter folder a line")
    ap.add_argument("--out", type=Path, required=True, help="output folder (shared storage)")
    ap.add_argument("--kind", choices=[*KINDS, "both"], default="merge")
    ap.add_argument("--dtype", choices=["bf16", "f16", "f32"], default=None)
    ap.add_argument("--address", default=None, help="Ray cluster address ('auto': running)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray cluster")
    ap.add_argument("--cpus-per-task", type=int, default=1)
    ap.add_argument("--retries", type=int, default=3, help="retries of a task whose worker died")
    args = ap.parse_args()

    adapters = list(args.adapters)
    if args.adapter_list is not None:
        lines = args.adapter_list.read_text(encoding="utf-8").splitlines()
        adapters += [Path(line.strip()) for line in lines if line.strip()]
    if not adapters:
        ap.error("no adapters: give --adapters or --adapter-list")
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        ap.error("two adapters have the same folder name: their outputs would collide")
    kinds = list(KINDS) if args.kind == "both" else [args.kind]

    if args.address is not None:
        ray.init(address=args.address)
    else:
        ray.init(num_cpus=args.num_cpus, include_dashboard=False)
    t0 = time.perf_counter()
    try:
        results = submit_all(
            args.base.resolve(),
            [a.resolve() for a in adapters],
            args.out.resolve(),
            kinds,
            dtype=args.dtype,
            cpus_per_task=args.cpus_per_task,
            retries=args.retries,
        )
    finally:
        ray.shutdown()
    failed = [r for r in results if "error" in r]
    summary = {
        "tasks": len(results),
        "failed": len(failed),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    print(json.dumps({"summary": summary}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
