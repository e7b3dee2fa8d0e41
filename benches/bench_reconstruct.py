"""Reconstruct benchmark: unilora_rs.reconstruct vs numpy ``theta[idx] * scale`` and a copy.

Rebuilds theta_D (D = 100,000,000 float32 by default) from theta_d (d = 524,288) and
measures, in one run and on the same machine:

* ``unilora_rs.reconstruct``: computes every index from the seed on the fly (Rust, GIL
  released, zero bytes of index memory), with a fresh output and with ``out=`` (a
  reused buffer), on all threads and on one thread;
* ``numpy``: ``np.take(vector, idx) * scale`` with a precomputed int64 ``idx`` and
  float32 ``scale`` (the explicit map; its 1.1 GiB are not counted in its time), with
  fresh outputs and with ``out=`` buffers;
* ``memory copy``: ``np.copy`` of a D-element float32 array (the cost of producing D
  fresh floats), and ``np.take`` alone (the random gather every method must do);
* ``projection="fastfood"``: the paper's dense Fastfood map (Walsh-Hadamard blocks of
  ``n`` values, O(D log n) work, no index memory either), against the sparse map.

The methods are interleaved (round r runs every method once), so that load from other
processes hits all of them alike; the median over ``--repeat`` rounds after one warm-up
round is reported, with the process CPU time (all threads) next to the wall time. The
script checks that both reconstructions are equal bit for bit.

    python benches/bench_reconstruct.py [--total N] [--d N] [--repeat K] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import unilora_rs as ur


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--total", type=int, default=100_000_000, help="D (default 1e8)")
    ap.add_argument("--d", type=int, default=524_288, help="d (default 2^19)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = ap.parse_args(argv)

    big_d, d, seed = args.total, args.d, args.seed
    shapes = [(big_d // 4, 4)] if big_d % 4 == 0 else [(big_d, 1)]
    vector = np.random.default_rng(seed).uniform(-0.02, 0.02, d).astype(np.float32)
    threads = ur.get_num_threads()
    print(
        f"D = {big_d:,}, d = {d:,}, threads = {threads}, cpus = {os.cpu_count()}", file=sys.stderr
    )

    t0 = time.perf_counter()
    idx32, scale = ur.projection(seed, big_d, d)
    idx = idx32.astype(np.int64)
    del idx32
    t_map = time.perf_counter() - t0
    index_bytes = idx.nbytes + scale.nbytes

    ours_buf = [np.empty(s, np.float32) for s in shapes]
    np_buf = np.empty(big_d, np.float32)
    src = np.ones(big_d, dtype=np.float32)

    def ours(n_threads: int, out: bool, projection: str = "sparse") -> Callable[[], object]:
        def run() -> object:
            ur.set_num_threads(n_threads)
            return ur.reconstruct(
                vector, seed, shapes, out=ours_buf if out else None, projection=projection
            )

        return run

    def numpy_out() -> object:
        # mode="clip": with out=, the default mode="raise" buffers the output (slower);
        # every index is valid, so the result is the same.
        np.take(vector, idx, out=np_buf, mode="clip")
        return np.multiply(np_buf, scale, out=np_buf)

    methods: list[tuple[str, Callable[[], object], int]] = [
        (f"unilora_rs.reconstruct ({threads} threads)", ours(threads, False), 0),
        ("numpy take(vector, idx) * scale", lambda: np.take(vector, idx) * scale, index_bytes),
        (f"unilora_rs.reconstruct, out= ({threads} threads)", ours(threads, True), 0),
        ("numpy take + multiply, out=", numpy_out, index_bytes),
        ("unilora_rs.reconstruct (1 thread)", ours(1, False), 0),
        ("unilora_rs.reconstruct, out= (1 thread)", ours(1, True), 0),
        ("memory copy (np.copy, D float32)", lambda: np.copy(src), 0),
        ("numpy take(vector, idx) alone", lambda: np.take(vector, idx), idx.nbytes),
        (f"fastfood reconstruct, out= ({threads} threads)", ours(threads, True, "fastfood"), 0),
        ("fastfood reconstruct, out= (1 thread)", ours(1, True, "fastfood"), 0),
    ]
    wall: dict[str, list[float]] = {name: [] for name, _, _ in methods}
    cpu: dict[str, list[float]] = {name: [] for name, _, _ in methods}
    load = [os.getloadavg()[0]]
    try:
        for rnd in range(args.repeat + 1):
            for name, fn, _ in methods:
                c0, t0 = time.process_time(), time.perf_counter()
                result = fn()
                t1, c1 = time.perf_counter(), time.process_time()
                del result
                if rnd:  # round 0 is the warm-up
                    wall[name].append(t1 - t0)
                    cpu[name].append(c1 - c0)
    finally:
        ur.set_num_threads(0)
    load.append(os.getloadavg()[0])

    ours_flat = np.asarray(ur.reconstruct(vector, seed, shapes)[0]).ravel()
    equal = bool(np.array_equal(ours_flat, np.take(vector, idx) * scale))

    med = {name: statistics.median(v) for name, v in wall.items()}
    med_cpu = {name: statistics.median(v) for name, v in cpu.items()}
    base = methods[0][0]
    rows = [(name, med[name], med_cpu[name], mem) for name, _, mem in methods]
    if args.markdown:
        print("| method | wall ms | CPU ms | G elem/s | index memory | vs ours |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name, t, c, mem in rows:
            print(
                f"| {name} | {t * 1e3:,.1f} | {c * 1e3:,.1f} | {big_d / t / 1e9:.2f} | "
                f"{mem / 2**20:,.0f} MiB | {t / med[base]:.2f}x |"
            )
    else:
        print(
            f"{'method':50} {'wall ms':>9} {'CPU ms':>9} {'Gelem/s':>8} "
            f"{'idx MiB':>8} {'vs ours':>8}"
        )
        for name, t, c, mem in rows:
            print(
                f"{name:50} {t * 1e3:9.1f} {c * 1e3:9.1f} {big_d / t / 1e9:8.2f} "
                f"{mem / 2**20:8.0f} {t / med[base]:7.2f}x"
            )
    names = [name for name, _, _ in methods]
    print(
        f"\nspeed-up over numpy take * scale (fresh outputs): {med[names[1]] / med[names[0]]:.2f}x"
    )
    print(
        f"speed-up over numpy take + multiply (out= buffers): {med[names[3]] / med[names[2]]:.2f}x"
    )
    print(
        f"{threads} threads vs 1 thread: {med[names[4]] / med[names[0]]:.2f}x (fresh), "
        f"{med[names[5]] / med[names[2]]:.2f}x (out=)"
    )
    print(f"time relative to memory copy: {med[names[0]] / med[names[6]]:.2f}x")
    print(
        f"fastfood vs sparse (out= buffers): {med[names[8]] / med[names[2]]:.2f}x on {threads} "
        f"threads, {med[names[9]] / med[names[5]]:.2f}x on 1 thread"
    )
    print(
        f"bit-identical to numpy: {equal}; explicit map build: {t_map:.2f} s (not timed above); "
        f"load average {load[0]:.2f} before, {load[1]:.2f} after"
    )
    return 0 if equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
