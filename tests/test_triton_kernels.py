"""The Triton kernels: interpreter parity, the launch wrapper, and GPU tests (``-m gpu``).

Interpreter checks run in subprocesses (tests/triton_interpreter_checks.py) because
``TRITON_INTERPRET=1`` must be set before any kernel is compiled. The ahead-of-time
compile checks (sm_80/sm_90, spills, one compile per width class) are in
tests/test_triton_aot.py.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import reference  # noqa: E402
import unilora_rs as ur  # noqa: E402
from torch_spec_reference import Spec  # noqa: E402
from unilora_rs.torch import kernels as K  # noqa: E402
from unilora_rs.torch.ops import triton as T  # noqa: E402
from unilora_rs.torch.params import ProjectionParams  # noqa: E402

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize(
    "check", ["forward", "forward_small_tiles", "forward_beyond_32_bits", "backward", "autograd"]
)
def test_in_interpreter(check: str) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(HERE))
    proc = subprocess.run(
        [sys.executable, str(HERE / "triton_interpreter_checks.py"), check],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"ok {check}" in proc.stdout


class _Recorder:
    """Stands in for ``torch.cuda.device`` and for a kernel; logs what happens."""

    def __init__(self) -> None:
        self.log: list[tuple[str, object]] = []

    def guard(self, device: torch.device) -> _Recorder._Guard:
        return _Recorder._Guard(self, device)

    class _Guard:
        def __init__(self, rec: _Recorder, device: torch.device) -> None:
            self.rec, self.device = rec, device

        def __enter__(self) -> None:
            self.rec.log.append(("enter", self.device))

        def __exit__(self, *exc: object) -> None:
            self.rec.log.append(("exit", self.device))

    def __getitem__(self, grid: tuple[int, ...]):  # type: ignore[no-untyped-def]
        return lambda *args, **meta: self.log.append(("launch", grid))


def test_launch_runs_under_the_tensor_device(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = _Recorder()
    monkeypatch.setattr(torch.cuda, "device", rec.guard)
    dev = torch.device("cuda", 1)
    T._launch(rec, (7,), dev, (), {})
    assert rec.log == [("enter", dev), ("launch", (7,)), ("exit", dev)]
    rec.log.clear()
    T._launch(rec, (7,), torch.device("cpu"), (), {})  # the interpreter: no CUDA guard
    assert rec.log == [("launch", (7,))]


def test_every_launch_goes_through_the_guarded_wrapper(monkeypatch: pytest.MonkeyPatch) -> None:
    """rebuild_forward/backward launch each kernel through ``_launch`` with the device of
    their input (a meta tensor here, so nothing runs), and nothing launches elsewhere."""
    calls: list[tuple[str, torch.device]] = []
    monkeypatch.setattr(
        T,
        "_launch",
        lambda kernel, grid, device, args, meta: calls.append((kernel.fn.__name__, device)),
    )
    p = ProjectionParams.create(3, 5000, 70)
    T.rebuild_forward(torch.empty(70, device="meta"), p)
    T.rebuild_backward(torch.empty(5000, device="meta"), p)
    meta = torch.device("meta")
    assert calls == [
        ("_forward_kernel", meta),
        ("_backward_chunk_kernel", meta),
        ("_backward_sum_kernel", meta),
    ]
    source = inspect.getsource(T)
    assert re.findall(r"\w+\[[\w(),. ]*\]\(", source) == ["kernel[grid]("]


def test_params_tensor_is_cached_per_projection_and_device() -> None:
    p = ProjectionParams.create(11, 9000, 300)
    a = T.params_tensor(p, torch.device("cpu"))
    assert T.params_tensor(ProjectionParams.create(11, 9000, 300), torch.device("cpu")) is a
    assert a.dtype == torch.int64 and a.numel() == T._N_PARAMS
    assert T.params_tensor(ProjectionParams.create(12, 9000, 300), torch.device("cpu")) is not a
    values = a.tolist()
    assert values[T._TOTAL.value] == 9000 and values[T._D.value] == 300
    assert values[T._K0.value : T._K3.value + 1] == list(p.keys)
    assert values[T._N_CHUNKS.value] == p.n_chunks == 1  # 30 t values per column


def test_projection_params_come_from_the_core() -> None:
    """Keys, widths, balance, scales and division constants agree with the spec text."""
    for seed, total, d in [(0, 1, 1), (3, 1000, 7), (2**64 - 1, 2**32, 2**32), (5, 10**8, 2**19)]:
        p = ProjectionParams.create(seed, total, d)
        spec = Spec(seed, total, d)
        assert list(p.keys) == spec.keys and (p.wl, p.wr) == (spec.wl, spec.wr)
        assert p.q * d + p.rem == total
        assert np.float32(p.scale_lo) == spec.scale(d - 1)
        assert np.float32(p.scale_hi) == np.float32(1 / np.sqrt(p.q + 1))
        assert p.narrow == (spec.wl + spec.wr <= 32 and d < 2**32)
        assert p.t_chunk == reference.T_CHUNK
        if p.narrow:  # the multiply-high division of fastdiv.rs, checked on edge values
            for y in {0, 1, d - 1, d, total - 1, 2**32 - 1, 12345 % total}:
                q = (y * p.div_magic) >> 32
                q = (q + ((y - q) >> p.div_shift1)) >> p.div_shift2
                assert q == y // d, (y, d)


# ---------------------------------------------------------------------------------------------
# On a GPU
# ---------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPU_CASES = [
    (0, 1, 1),
    (7, 1000, 37),
    (2**64 - 1, 4097, 100),
    (5, 1 << 20, 4096),
    (4, 641, 10),
    (6, 3_000_000, 1),
    (9, 3_000_001, 2**17),
    (10, 10_000_000, 10_000),
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("seed", "total", "d"), GPU_CASES)
@pytest.mark.parametrize("wide", [False, True])
def test_gpu_kernels_match_the_cpu_bit_for_bit(seed: int, total: int, d: int, wide: bool) -> None:
    import dataclasses

    p = ProjectionParams.create(seed, total, d)
    if wide:
        p = dataclasses.replace(p, narrow=False)
    gen = torch.Generator().manual_seed(seed % 1000)
    theta = torch.randn(d, generator=gen)
    grad = torch.randn(total, generator=gen)
    (want,) = ur.reconstruct(theta.numpy(), seed, [(total, 1)])
    out = T.rebuild_forward(theta.cuda(), p).cpu().numpy()
    assert np.array_equal(out, want.ravel())
    got = T.rebuild_backward(grad.cuda(), p)
    assert torch.equal(got, T.rebuild_backward(grad.cuda(), p))  # deterministic
    rust = ur.reconstruct_backward(grad.numpy(), seed, d)
    assert np.array_equal(got.cpu().numpy().view(np.uint32), rust.view(np.uint32))


def _cache_size(kernel: object) -> int:
    caches = kernel.device_caches  # type: ignore[attr-defined]
    return sum(len(c[0]) for c in caches.values())


@pytest.mark.gpu
@needs_cuda
def test_gpu_one_compile_for_every_seed_and_d() -> None:
    kernels = (T._forward_kernel, T._backward_chunk_kernel, T._backward_sum_kernel)
    cases = [
        (1, 200_000, 1000),
        (2, 200_000, 1000),
        (2**63 + 5, 200_000, 5000),
        (12345, 300_000, 77),
        (2**64 - 1, 2**31 + 7, 4096),
    ]
    seen: list[int] = []
    for seed, total, d in cases:
        p = ProjectionParams.create(seed, total, d)
        T.rebuild_backward(torch.ones(total, device="cuda"), p)
        T.rebuild_forward(torch.ones(d, device="cuda"), p)
        torch.cuda.synchronize()
        seen.append(sum(_cache_size(k) for k in kernels))
    # the first projection may compile (once per kernel); the others add nothing
    assert seen[1:] == [seen[0]] * (len(cases) - 1), seen


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_launches_on_the_tensor_device() -> None:
    p = ProjectionParams.create(3, 100_000, 999)
    theta = torch.randn(999)
    grad = torch.randn(100_000)
    with torch.cuda.device(0):
        out = T.rebuild_forward(theta.to("cuda:1"), p)
        g = T.rebuild_backward(grad.to("cuda:1"), p)
    assert out.device == torch.device("cuda", 1)
    (want,) = ur.reconstruct(theta.numpy(), 3, [(100_000, 1)])
    assert np.array_equal(out.cpu().numpy(), want.ravel())
    assert np.array_equal(g.cpu().numpy(), ur.reconstruct_backward(grad.numpy(), 3, 999))


@pytest.mark.gpu
@needs_cuda
def test_gpu_beyond_32_bits() -> None:
    """D = 5e9 (the WIDE path on a real GPU): golden vector G4 rows and a few columns
    of the backward against the spec text. Needs about 45 GB of device memory."""
    seed, total, d = 7, 5_000_000_000, 524_288
    if torch.cuda.mem_get_info()[0] < 48 * 2**30:
        pytest.skip("needs about 48 GiB of free device memory")
    p = ProjectionParams.create(seed, total, d)
    spec = Spec(seed, total, d)
    theta = torch.arange(d, dtype=torch.float32, device="cuda")
    out = T.rebuild_forward(theta, p)
    rows = [0, 1, 2, 3, 4_294_967_296, 4_999_999_999]
    got = out[torch.tensor(rows, device="cuda")].cpu().numpy()
    want = [62654, 474627, 402121, 376218, 20137, 317302]
    assert got.tolist() == [np.float32(j * spec.scale(j)) for j in want]
    del out
    grad = torch.randn(total, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    g = T.rebuild_backward(grad, p).cpu().numpy()
    for j in (0, 1, d - 1):
        ys = [spec.perm_inv(j + t * d) for t in range(spec.count(j))]
        vals = grad[torch.tensor(ys, device="cuda")].cpu().numpy()
        acc = np.float32(0)
        for c in range(0, len(vals), 64):
            part = np.float32(0)
            for v in vals[c : c + 64]:
                part = np.float32(part + v)
            acc = np.float32(acc + part)
        assert g[j] == np.float32(acc * spec.scale(j)), j


@pytest.mark.gpu
@needs_cuda
def test_gpu_custom_op_and_autograd() -> None:
    p = ProjectionParams.create(5, 1 << 20, 4096)
    theta = torch.randn(4096, device="cuda", requires_grad=True)
    upstream = torch.randn(1 << 20, device="cuda")
    (K.rebuild(theta, p) * upstream).sum().backward()  # backend "auto" -> Triton on CUDA
    assert K.resolve_backend(theta.device, "auto") == "triton"
    expected = ur.reconstruct_backward(upstream.cpu().numpy(), 5, 4096)
    assert theta.grad is not None
    assert np.array_equal(theta.grad.cpu().numpy(), expected)


def test_gpu_benchmark_script_runs_in_the_interpreter(tmp_path: Path) -> None:
    """benches/bench_gpu.py end to end on a tiny D (a smoke test, not a measurement),
    and benches/gpu_check.sh parses."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = tmp_path / "bench.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(HERE.parent / "benches" / "bench_gpu.py"),
            "--device",
            "cpu",
            "--total",
            "3000",
            "--d",
            "10",
            "--reps",
            "1",
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = out.read_text()
    assert "forward == gather bit for bit: True" in text
    assert "backward deterministic: True" in text
    script = HERE.parent / "benches" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
