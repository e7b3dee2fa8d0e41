"""How close the Fastfood projection is to an isometry: ``||P^T P - I||`` measured.

Builds ``P`` (``D x d``) column by column with ``unilora_rs.reconstruct(e_j,
projection="fastfood")`` and prints, for a few ``(D, d)``: the spectral norm
``||P^T P - I||_2``, the extreme eigenvalues of ``P^T P``, the largest deviation of its
diagonal from 1 and its largest off-diagonal entry, with the sparse spec v1 map of the
same sizes next to it (0 up to the float32 rounding of its scales: its columns are orthonormal).

    python benches/fastfood_isometry.py [--sizes D:d,D:d,...] [--seed S]
"""

from __future__ import annotations

import argparse

import numpy as np
import unilora_rs as ur


def gram(seed: int, total: int, d: int, projection: str) -> np.ndarray:
    eye = np.eye(d, dtype=np.float32)
    cols = [
        ur.reconstruct(eye[j], seed, [(total, 1)], projection=projection)[0].ravel()
        for j in range(d)
    ]
    p = np.stack(cols, axis=1).astype(np.float64)
    return p.T @ p


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4096:256,16384:256,20480:1024,65536:1024,262144:1024")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(
        "| D | d | D/d | fastfood norm2(P^T P - I) | eigenvalues of P^T P | max abs(diag - 1) "
        "| max abs(off-diag) | sparse norm2(P^T P - I) |"
    )
    print("| ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    for item in args.sizes.split(","):
        total, d = (int(x) for x in item.split(":"))
        g = gram(args.seed, total, d, "fastfood")
        dev = g - np.eye(d)
        ev = np.linalg.eigvalsh(g)
        off = dev - np.diag(np.diag(dev))
        sparse = np.linalg.norm(gram(args.seed, total, d, "sparse") - np.eye(d), 2)
        print(
            f"| {total:,} | {d:,} | {total / d:g} | {np.linalg.norm(dev, 2):.3f} | "
            f"[{ev.min():.3f}, {ev.max():.3f}] | {np.abs(np.diag(dev)).max():.1e} | "
            f"{np.abs(off).max():.3f} | {sparse:.1e} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
