"""Parity of the torch / Rust-on-CPU / Triton kernels with the Rust core and the spec text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import reference  # noqa: E402
import unilora_rs as ur  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch_spec_reference import Spec  # noqa: E402
from unilora_rs.errors import InvalidArgumentError  # noqa: E402
from unilora_rs.torch import kernels as K  # noqa: E402

HERE = Path(__file__).resolve().parent

# (seed, D, d): tiny sizes, D just above a power of two (long cycle walks), d = 1, d = D,
# D mod d == 0, the largest seed.
CASES = [
    (0, 1, 1),
    (1, 2, 1),
    (3, 3, 2),
    (7, 1000, 37),
    (11, 1024, 1024),
    (12, 1025, 5),
    (2**64 - 1, 4097, 100),
    (5, 6000, 1500),
    (42, 16385, 1000),
]


def _reference_rebuild(theta: np.ndarray, seed: int, total: int) -> torch.Tensor:
    (flat,) = ur.reconstruct(theta, seed, [(total, 1)])
    return torch.from_numpy(flat.reshape(-1))


def _autograd_reference(theta: torch.Tensor, seed: int, total: int) -> torch.Tensor:
    """theta[idx] * scale with the explicit map (plain torch autograd)."""
    idx, scale = ur.projection(seed, total, theta.numel())
    return theta[torch.from_numpy(idx.astype(np.int64))] * torch.from_numpy(scale)


@pytest.mark.parametrize(("seed", "total", "d"), CASES)
def test_torch_generator_matches_rust_map(seed: int, total: int, d: int) -> None:
    p = K.ProjectionParams.create(seed, total, d)
    rows = torch.arange(total)
    idx, _ = ur.projection(seed, total, d)
    assert torch.equal(K.column_index(rows, p), torch.from_numpy(idx.astype(np.int64)))
    perm = K.permute(rows, p)
    assert torch.equal(torch.sort(perm).values, rows)  # a bijection of [0, D)
    assert torch.equal(K.inverse_permute(perm, p), rows)
    assert torch.equal(K.build_index_map(p, "cpu"), torch.from_numpy(idx))


def test_torch_generator_large_domain_matches_spec_text() -> None:
    # D > 2^32: a 41-bit Feistel domain, random access only (no map can be built).
    total, d, seed = (1 << 40) + 12345, (1 << 32), 987654321
    p = K.ProjectionParams.create(seed, total, d)
    spec = Spec(seed, total, d)
    rows = [0, 1, 2, 77, (1 << 33) + 5, total // 2, total - 2, total - 1]
    got = K.permute(torch.tensor(rows), p).tolist()
    assert got == [spec.perm(i) for i in rows]
    assert K.inverse_permute(torch.tensor(got), p).tolist() == rows


@pytest.mark.parametrize("mode", ["torch", "rust", "cached"])
@pytest.mark.parametrize(("seed", "total", "d"), CASES)
def test_rebuild_is_bit_exact(mode: str, seed: int, total: int, d: int) -> None:
    p = K.ProjectionParams.create(seed, total, d)
    theta = torch.randn(d, generator=torch.Generator().manual_seed(seed % 1000))
    if mode == "cached":
        out = K.rebuild(theta, p, index=K.build_index_map(p, "cpu"))
    else:
        out = K.rebuild(theta, p, backend=mode)
    assert out.dtype == torch.float32
    assert torch.equal(out, _reference_rebuild(theta.numpy(), seed, total))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**64 - 1),
    total=st.integers(1, 5000),
    frac=st.floats(0.0, 1.0),
)
def test_rebuild_property(seed: int, total: int, frac: float) -> None:
    d = max(1, min(total, int(total * frac)))
    p = K.ProjectionParams.create(seed, total, d)
    theta = torch.rand(d) * 2 - 1
    ref = _reference_rebuild(theta.numpy(), seed, total)
    assert torch.equal(K.rebuild(theta, p, backend="torch"), ref)
    assert torch.equal(K.rebuild(theta, p, backend="rust"), ref)


@pytest.mark.parametrize("mode", ["torch", "rust", "cached"])
@pytest.mark.parametrize(("seed", "total", "d"), [c for c in CASES if c[1] <= 6000])
def test_gradient_matches_autograd(mode: str, seed: int, total: int, d: int) -> None:
    p = K.ProjectionParams.create(seed, total, d)
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(d, generator=gen)
    upstream = torch.randn(total, generator=gen)

    ours = base.clone().requires_grad_(True)
    if mode == "cached":
        out = K.rebuild(ours, p, index=K.build_index_map(p, "cpu"))
    else:
        out = K.rebuild(ours, p, backend=mode)
    (out * upstream).sum().backward()

    ref = base.clone().requires_grad_(True)
    (_autograd_reference(ref, seed, total) * upstream).sum().backward()
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("seed", "total", "d"), [(3, 700, 9), (4, 641, 10), (5, 30_000, 2), (6, 350_000, 5000)]
)
def test_torch_backward_is_the_spec_order_bit_for_bit(seed: int, total: int, d: int) -> None:
    """The int64-torch fallback sums in the chunked order of SPEC 1.4: whole chunks per
    step (small d) and parts of one chunk per step (d above CHUNK_ROWS / 64)."""
    p = K.ProjectionParams.create(seed, total, d)
    grad = torch.randn(total, generator=torch.Generator().manual_seed(2))
    first = K.rebuild_backward_reference(grad, p)
    want = reference.backward(grad.numpy(), seed, d)
    assert np.array_equal(first.numpy().view(np.uint32), want.view(np.uint32))
    if total <= 1000:
        spec = Spec(seed, total, d).backward(grad.numpy())
        assert np.array_equal(first.numpy().view(np.uint32), spec.view(np.uint32))


@pytest.mark.parametrize(("seed", "total", "d"), [c for c in CASES if c[1] <= 6000])
def test_rust_backward_is_the_spec_ordered_sum_bit_for_bit(seed: int, total: int, d: int) -> None:
    """The CPU backward sums in the spec's inverse-enumeration order, like the Triton kernel."""
    p = K.ProjectionParams.create(seed, total, d)
    grad = torch.randn(total, generator=torch.Generator().manual_seed(seed % 1000))
    theta = torch.zeros(d, requires_grad=True)
    (K.rebuild(theta, p, backend="rust") * grad).sum().backward()
    expected = Spec(seed, total, d).backward(grad.numpy())
    assert theta.grad is not None
    assert np.array_equal(theta.grad.numpy().view(np.uint32), expected.view(np.uint32))


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="larger than the total size"):
        K.ProjectionParams.create(0, 10, 11)
    with pytest.raises(InvalidArgumentError, match="at least 1"):
        K.ProjectionParams.create(0, 10, 0)
    p = K.ProjectionParams.create(0, 10, 4)
    with pytest.raises(InvalidArgumentError, match="length d = 4"):
        K.rebuild(torch.zeros(5), p)
    with pytest.raises(InvalidArgumentError, match="float32"):
        K.rebuild(torch.zeros(4, dtype=torch.float64), p)
    with pytest.raises(InvalidArgumentError, match="not one of"):
        K.rebuild(torch.zeros(4), p, backend="cuda")
    if not K.triton_interpret():
        with pytest.raises(InvalidArgumentError, match="needs Triton and a CUDA tensor"):
            K.rebuild(torch.zeros(4), p, backend="triton")


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    ("seed", "total", "d"),
    [(0, 1, 1), (7, 1000, 37), (2**64 - 1, 4097, 100), (5, 1 << 20, 4096), (9, 3_000_001, 2**17)],
)
def test_triton_matches_cpu_on_gpu(seed: int, total: int, d: int) -> None:
    p = K.ProjectionParams.create(seed, total, d)
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(d, generator=gen)
    grad = torch.randn(total, generator=gen)
    out = K.rebuild(theta.cuda(), p, backend="triton")
    assert torch.equal(out.cpu(), _reference_rebuild(theta.numpy(), seed, total))
    t = theta.cuda().requires_grad_(True)
    (K.rebuild(t, p, backend="triton") * grad.cuda()).sum().backward()
    g1 = t.grad.clone()
    t.grad = None
    (K.rebuild(t, p, backend="triton") * grad.cuda()).sum().backward()
    assert torch.equal(g1, t.grad)  # deterministic: no atomics
    cpu = theta.clone().requires_grad_(True)
    (K.rebuild(cpu, p, backend="rust") * grad).sum().backward()
    # Both sum each column over the inverse enumeration in the same order: same bits.
    assert torch.equal(g1.cpu(), cpu.grad)
    # the torch fallback on CUDA agrees bit for bit in the forward pass too
    assert torch.equal(K.rebuild(theta.cuda(), p, backend="torch").cpu(), out.cpu())


GOLDEN = json.loads((HERE / "data" / "golden.json").read_text())


def _golden_check(device: str, backend: str) -> None:
    for case in (g for g in GOLDEN if "checksum" in g and g["total"] <= 20_000_000):
        p = K.ProjectionParams.create(case["seed"], case["total"], case["d"])
        # theta_d = 0, 1, 2, ... (exact in float32): theta_D[i] = idx(i) * scale(i).
        theta = torch.arange(case["d"], dtype=torch.float32, device=device)
        out = K.rebuild(theta, p, backend=backend)[:12].cpu().numpy()
        scale = np.array([int(b, 16) for b in case["scale_bits"]], dtype=np.uint32).view(np.float32)
        want = np.array(case["idx"], dtype=np.float32) * scale
        assert np.array_equal(out.view(np.uint32), want.view(np.uint32)), (device, case["seed"])


@pytest.mark.parametrize("backend", ["torch", "rust"])
def test_golden_vectors_cpu(backend: str) -> None:
    _golden_check("cpu", backend)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_golden_vectors_gpu(backend: str) -> None:
    _golden_check("cuda", backend)
