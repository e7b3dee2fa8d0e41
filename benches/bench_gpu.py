"""GPU kernel benchmark: the Triton forward/backward against a device copy and PEFT's way.

For D = 100,000,000 and d in {10,000, 2^17, 2^19} (float32), in one run on one device:

* ``copy``: ``dst.copy_(src)`` of D floats (reads and writes 4 D bytes each: the
  practical memory-bandwidth ceiling) and ``fill_`` (writes only);
* ``ours forward``: :func:`rebuild_forward`, indices from the seed (writes 4 D bytes);
* ``gather``: ``theta[idx] * scale`` with a precomputed int64 ``idx`` and float32
  ``scale`` (what PEFT's Uni-LoRA does; reads 12 D bytes of map, writes 4 D);
* ``ours backward``: :func:`rebuild_backward`, the ordered two-stage sum (reads 4 D);
* ``index_add_``: ``zeros(d).index_add_(0, idx, grad * scale)``, the autograd backward
  of the gather (atomic, not deterministic).

GB/s counts the bytes each method must move at least (the ``theta``/``d``-sized traffic
is left out). Also printed: bit-equality of ours and the gather, run-to-run equality of
our backward, and how many kernels were compiled across five seeds and sizes.

    python benches/bench_gpu.py [--total N] [--reps K] [--out FILE.md] [--json FILE]

``--device cpu`` (with ``TRITON_INTERPRET=1`` and a small ``--total``) runs the same
code in Triton's interpreter: a smoke test of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton
import unilora_rs as ur
from unilora_rs.torch.ops import triton as T
from unilora_rs.torch.params import ProjectionParams


def timed(fn: Callable[[], object], reps: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs (CUDA events on a GPU)."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if not cuda:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def gather(theta: torch.Tensor, idx: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """PEFT's way: an explicit int64 index and a float32 scale per row."""
    return theta[idx] * scale


def index_add(
    acc: torch.Tensor, idx: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """The autograd backward of :func:`gather` (atomic adds, order not fixed)."""
    acc.zero_()
    return acc.index_add_(0, idx, grad * scale)


def compiled(kernel: Any) -> int:
    """Number of compiled variants of a Triton kernel on all devices (0 in the
    interpreter, which compiles nothing)."""
    caches = getattr(kernel, "device_caches", {})
    return sum(len(c[0]) for c in caches.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--total", type=int, default=100_000_000)
    ap.add_argument("--d", type=int, nargs="+", default=[10_000, 2**17, 2**19])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    ap.add_argument("--json", type=Path, default=None, help="write the raw figures here")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device", file=sys.stderr)
        return 2
    total = args.total
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (interpreter smoke test)"
    header = (
        f"{name}, torch {torch.__version__}, triton {triton.__version__}; D = {total:,} "
        f"float32, median of {args.reps} runs after 3 warm-up runs"
    )
    print(header, flush=True)
    rows: list[dict[str, Any]] = []

    def add(what: str, d: int | None, ms: float, nbytes: int, note: str = "") -> None:
        gbs = nbytes / ms / 1e6
        rows.append({"what": what, "d": d, "ms": ms, "gb_s": gbs, "note": note})
        print(f"{what:38} d={d!s:>8} {ms * 1e3:10.1f} us {gbs:8.1f} GB/s {note}", flush=True)

    src = torch.rand(total, device=dev)
    dst = torch.empty_like(src)
    t_copy = timed(partial(dst.copy_, src), args.reps)
    add("copy (read + write)", None, t_copy, 8 * total)
    t_fill = timed(partial(dst.fill_, 1.5), args.reps)
    add("fill (write)", None, t_fill, 4 * total)
    copy_gbs = 8 * total / t_copy / 1e6
    del src, dst

    summary = []
    for d in args.d:
        p = ProjectionParams.create(args.seed, total, d)
        theta = torch.randn(d, device=dev)
        grad = torch.randn(total, device=dev)
        idx32, scale_np = ur.projection(args.seed, total, d)
        idx = torch.from_numpy(idx32).to(dev).long()
        scale = torch.from_numpy(scale_np).to(dev)
        del idx32, scale_np

        t_fwd = timed(partial(T.rebuild_forward, theta, p), args.reps)
        add("ours forward (on-the-fly idx)", d, t_fwd, 4 * total)
        t_gather = timed(partial(gather, theta, idx, scale), args.reps)
        add("gather theta[idx] * scale (int64 idx)", d, t_gather, 16 * total)
        same = torch.equal(T.rebuild_forward(theta, p), gather(theta, idx, scale))

        t_bwd = timed(partial(T.rebuild_backward, grad, p), args.reps)
        add("ours backward (ordered, 2 stages)", d, t_bwd, 4 * total)
        acc = torch.zeros(d, device=dev)
        t_iadd = timed(partial(index_add, acc, idx, grad, scale), args.reps)
        add("index_add_(idx, grad * scale) (atomic)", d, t_iadd, 16 * total)
        g1, g2 = T.rebuild_backward(grad, p), T.rebuild_backward(grad, p)
        deterministic = torch.equal(g1, g2)
        close = torch.allclose(g1, index_add(acc, idx, grad, scale), rtol=1e-4, atol=1e-4)
        summary.append(
            {
                "d": d,
                "forward_of_copy_bw": (4 * total / t_fwd / 1e6) / copy_gbs,
                "forward_vs_gather": t_gather / t_fwd,
                "backward_of_copy_bw": (4 * total / t_bwd / 1e6) / copy_gbs,
                "backward_vs_index_add": t_iadd / t_bwd,
                "forward_equals_gather": same,
                "backward_deterministic": deterministic,
                "backward_close_to_index_add": close,
            }
        )
        del theta, grad, idx, scale, acc, g1, g2
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    # One compile for every seed and size (32-bit domains).
    kernels = (T._forward_kernel, T._backward_chunk_kernel, T._backward_sum_kernel)
    before = [compiled(k) for k in kernels]
    small = min(total, 200_000)
    for seed, d in ((1, 1000), (2, 1000), (2**63 + 5, 5000), (12345, 77), (99, 4096)):
        p = ProjectionParams.create(seed, small, min(d, small))
        T.rebuild_forward(torch.ones(p.d, device=dev), p)
        T.rebuild_backward(torch.ones(small, device=dev), p)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    after = [compiled(k) for k in kernels]
    compiles = {k.fn.__name__: a for k, a in zip(kernels, after, strict=True)}  # type: ignore[attr-defined]
    new = sum(after) - sum(before)

    lines = [
        f"{header}.",
        "",
        "| d | forward GB/s | of copy | vs gather | backward GB/s | of copy | vs index_add_ |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in summary:
        fwd = next(r for r in rows if r["d"] == s["d"] and r["what"].startswith("ours forward"))
        bwd = next(r for r in rows if r["d"] == s["d"] and r["what"].startswith("ours backward"))
        lines.append(
            f"| {s['d']:,} | {fwd['gb_s']:,.0f} | {s['forward_of_copy_bw']:.0%} | "
            f"{s['forward_vs_gather']:.2f}x | {bwd['gb_s']:,.0f} | "
            f"{s['backward_of_copy_bw']:.0%} | {s['backward_vs_index_add']:.2f}x |"
        )
    lines += [
        "",
        f"copy {copy_gbs:,.0f} GB/s (read + write), fill "
        f"{4 * total / t_fill / 1e6:,.0f} GB/s. 'of copy': our GB/s over the copy's. "
        "'vs gather' / 'vs index_add_': their time over ours (above 1: ours is faster).",
        f"forward == gather bit for bit: {all(s['forward_equals_gather'] for s in summary)}; "
        f"backward deterministic: {all(s['backward_deterministic'] for s in summary)}; "
        f"close to index_add_: {all(s['backward_close_to_index_add'] for s in summary)}; "
        f"compiled kernels after {len(args.d)} sizes and 5 more seeds/sizes: {compiles} "
        f"(new compiles for the 5: {new})",
    ]
    table = "\n".join(lines)
    print()
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    if args.json:
        args.json.write_text(
            json.dumps({"header": header, "rows": rows, "summary": summary}, indent=1)
        )
    ok = all(
        s["forward_equals_gather"]
        and s["backward_deterministic"]
        and s["backward_close_to_index_add"]
        for s in summary
    )
    return 0 if ok and new == 0 and np.isfinite(copy_gbs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
