"""Checks of the Triton kernels in Triton's interpreter (run with TRITON_INTERPRET=1).

Usage: ``TRITON_INTERPRET=1 python tests/triton_interpreter_checks.py NAME...``; prints
``ok NAME`` per passed check. tests/test_triton_kernels.py runs each in a subprocess
(the interpreter must be chosen before Triton compiles anything). References: the
Rust core (``unilora_rs.reconstruct`` / ``reconstruct_backward``), the numpy reading of
the spec (reference.py) and the pure-Python one (torch_spec_reference.py).
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
import reference
import torch
import unilora_rs as ur
from torch_spec_reference import Spec
from unilora_rs.torch import kernels as K
from unilora_rs.torch.ops import triton as T
from unilora_rs.torch.params import ProjectionParams

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

# (seed, D, d): single rows, d = 1 and d = D, D just above a power of two (long walks),
# D across forward tiles (8192 rows), several backward column blocks (256) and chunks
# (64 t values): exactly 64, 64 + 1 and many.
FORWARD_CASES = [
    (0, 1, 1),
    (1, 2, 1),
    (3, 3, 2),
    (7, 300, 37),
    (2**64 - 1, 1025, 100),
    (12, 257, 5),
    (9, 200, 200),
    (4, 8193, 1000),
    (6, 20_000, 37),
]
BACKWARD_CASES = [
    (0, 1, 1),
    (3, 700, 9),
    (4, 640, 10),
    (4, 641, 10),
    (5, 2000, 3),
    (2**64 - 1, 1025, 100),
    (6, 5000, 1300),
]


def _both_widths(p: ProjectionParams) -> list[ProjectionParams]:
    """``p`` and the same projection forced onto the WIDE (uint64, ``%``) path."""
    return [p, dataclasses.replace(p, narrow=False)] if p.narrow else [p]


def forward() -> None:
    for seed, total, d in FORWARD_CASES:
        p = ProjectionParams.create(seed, total, d)
        theta = torch.randn(d, generator=torch.Generator().manual_seed(seed % 97))
        (want,) = ur.reconstruct(theta.numpy(), seed, [(total, 1)])
        for q in _both_widths(p):
            out = T.rebuild_forward(theta, q)
            assert np.array_equal(out.numpy(), want.ravel()), (seed, total, d, q.narrow)


def forward_small_tiles() -> None:
    """Persistent lanes with tiles of 16 lanes x 4 rows: many tiles, lanes that finish
    rows early start their next row while others still walk."""
    for seed, total, d in [(7, 300, 37), (2**64 - 1, 1025, 100)]:
        p = ProjectionParams.create(seed, total, d)
        theta = torch.randn(d, generator=torch.Generator().manual_seed(1))
        (want,) = ur.reconstruct(theta.numpy(), seed, [(total, 1)])
        for q in _both_widths(p):
            out = torch.full((total,), float("nan"))
            prm = T.params_tensor(q, out.device)
            grid = (-(-total // 64),)
            T._forward_kernel[grid](
                theta, out, prm, q.scale_hi, q.scale_lo, LANES=16, ROWS=4, WIDE=not q.narrow
            )
            assert np.array_equal(out.numpy(), want.ravel()), (seed, total, d, q.narrow)


def forward_beyond_32_bits() -> None:
    """D = 5e9 (a 33-bit domain, the WIDE path): the first tile against the spec text
    and the golden vector G4."""
    seed, total, d = 7, 5_000_000_000, 524_288
    p = ProjectionParams.create(seed, total, d)
    assert not p.narrow
    theta = torch.arange(d, dtype=torch.float32)  # theta_D[i] = idx(i) * scale(i)
    out = torch.empty(64)
    T._forward_kernel[(1,)](
        theta,
        out,
        T.params_tensor(p, out.device),
        p.scale_hi,
        p.scale_lo,
        LANES=16,
        ROWS=4,
        WIDE=True,
    )
    spec = Spec(seed, total, d)
    want = np.array([spec.idx(i) * spec.scale(spec.idx(i)) for i in range(64)], np.float32)
    assert np.array_equal(out.numpy(), want)
    assert [spec.idx(i) for i in range(4)] == [62654, 474627, 402121, 376218]


def backward() -> None:
    for seed, total, d in BACKWARD_CASES:
        p = ProjectionParams.create(seed, total, d)
        grad = torch.randn(total, generator=torch.Generator().manual_seed(seed % 89))
        want = reference.backward(grad.numpy(), seed, d)
        rust = ur.reconstruct_backward(grad.numpy(), seed, d)
        assert np.array_equal(want.view(np.uint32), rust.view(np.uint32)), (seed, total, d)
        for q in _both_widths(p):
            got = T.rebuild_backward(grad, q).numpy()
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (
                seed,
                total,
                d,
                q.narrow,
            )
    # The pure-Python reading of the spec on a multi-chunk case.
    seed, total, d = 3, 700, 9
    grad = torch.randn(total, generator=torch.Generator().manual_seed(5))
    want = Spec(seed, total, d).backward(grad.numpy())
    got = T.rebuild_backward(grad, ProjectionParams.create(seed, total, d)).numpy()
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def autograd() -> None:
    """Through the custom operator and autograd with backend='triton'."""
    for seed, total, d in [(7, 300, 37), (5, 2000, 3), (9, 200, 200)]:
        p = ProjectionParams.create(seed, total, d)
        gen = torch.Generator().manual_seed(seed)
        theta = torch.randn(d, generator=gen).requires_grad_(True)
        upstream = torch.randn(total, generator=gen)
        out = K.rebuild(theta, p, backend="triton")
        (want,) = ur.reconstruct(theta.detach().numpy(), seed, [(total, 1)])
        assert np.array_equal(out.detach().numpy(), want.ravel())
        (out * upstream).sum().backward()
        expected = ur.reconstruct_backward(upstream.numpy(), seed, d)
        assert theta.grad is not None
        assert np.array_equal(theta.grad.numpy().view(np.uint32), expected.view(np.uint32))


CHECKS = {
    f.__name__: f
    for f in (forward, forward_small_tiles, forward_beyond_32_bits, backward, autograd)
}

if __name__ == "__main__":
    for name in sys.argv[1:]:
        CHECKS[name]()
        print("ok", name, flush=True)
