"""Reconstruct benchmark: unilora_rs.reconstruct vs numpy take and a plain memory copy.

Rebuilds theta_D (D = 100,000,000 float32 by default) from theta_d (d = 524,288) and
measures, in one run and on the same machine:

* ``unilora_rs.reconstruct``: computes every index from the seed on the fly (Rust,
  all threads, GIL released) and allocates its output;
* ``numpy take``: ``np.take(vector, idx) * scale`` with a precomputed int64 ``idx`` and
  float32 ``scale`` (the explicit map; its 1.2 GB are not counted in its time);
* ``memory copy``: ``np.copy`` of a D-element float32 array (allocate + copy: the
  physical limit for producing D fresh floats);
* for context, ``numpy take`` alone (the random gather from ``theta_d`` that every
  method must do, without the scale) and ``unilora_rs.reconstruct`` on one thread.

Each is run ``--repeat`` times after one warm-up; the median is reported. The script
also checks that the two reconstructions are equal bit for bit.

    python benches/bench_reconstruct.py [--total N] [--d N] [--repeat K] [--markdown]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import unilora_rs as ur


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    result = fn()  # warm-up (also the result kept for the equality check)
    times = []
    for _ in range(repeat):
        del result
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--total", type=int, default=100_000_000, help="D (default 1e8)")
    ap.add_argument("--d", type=int, default=524_288, help="d (default 2^19)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = ap.parse_args(argv)

    big_d, d = args.total, args.d
    shapes = [(big_d // 4, 4)] if big_d % 4 == 0 else [(big_d, 1)]
    vector = np.random.default_rng(args.seed).uniform(-0.02, 0.02, d).astype(np.float32)

    print(f"D = {big_d:,}, d = {d:,}, threads = {ur.get_num_threads()}", file=sys.stderr)
    t0 = time.perf_counter()
    idx32, scale = ur.projection(args.seed, big_d, d)
    idx = idx32.astype(np.int64)
    del idx32
    t_map = time.perf_counter() - t0
    index_bytes = idx.nbytes + scale.nbytes

    t_ours, ours = timed(lambda: ur.reconstruct(vector, args.seed, shapes)[0], args.repeat)
    threads = ur.get_num_threads()
    try:
        ur.set_num_threads(1)
        t_one, _ = timed(lambda: ur.reconstruct(vector, args.seed, shapes)[0], args.repeat)
    finally:
        ur.set_num_threads(0)
    t_np, ref = timed(lambda: np.take(vector, idx) * scale, args.repeat)
    t_take, _ = timed(lambda: np.take(vector, idx), args.repeat)
    equal = bool(np.array_equal(np.asarray(ours).ravel(), np.asarray(ref)))
    del ours, ref
    src = np.ones(big_d, dtype=np.float32)
    t_cp, _ = timed(lambda: np.copy(src), args.repeat)

    rows = [
        (f"unilora_rs.reconstruct (on-the-fly idx, {threads} threads)", t_ours, 0),
        ("numpy take(vector, idx) * scale", t_np, index_bytes),
        ("memory copy (np.copy, D float32)", t_cp, 0),
        ("context: unilora_rs.reconstruct, 1 thread", t_one, 0),
        ("context: numpy take(vector, idx) alone", t_take, idx.nbytes),
    ]
    if args.markdown:
        print("| method | time (ms) | G elem/s | index memory | vs ours |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name, t, mem in rows:
            print(
                f"| {name} | {t * 1e3:,.1f} | {big_d / t / 1e9:.2f} | "
                f"{mem / 2**20:,.0f} MiB | {t / t_ours:.2f}x |"
            )
    else:
        print(f"{'method':52} {'time ms':>10} {'Gelem/s':>8} {'index MiB':>10} {'vs ours':>8}")
        for name, t, mem in rows:
            print(
                f"{name:52} {t * 1e3:10.1f} {big_d / t / 1e9:8.2f} {mem / 2**20:10.0f} "
                f"{t / t_ours:7.2f}x"
            )
    print(f"\nspeed-up over numpy take * scale: {t_np / t_ours:.2f}x (target >= 4x)")
    print(f"time relative to memory copy: {t_ours / t_cp:.2f}x (target <= 3x)")
    print(
        f"bit-identical to numpy: {equal}; explicit map build: {t_map:.2f} s "
        f"(not part of any timing above)"
    )
    return 0 if equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
