"""The numpy API of the Rust core: generator spec v1, reconstruct, fingerprint, errors."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import reference as ref
import unilora_rs as ur
from hypothesis import given, settings
from hypothesis import strategies as st

GOLDEN = json.loads((Path(__file__).parent / "data" / "golden.json").read_text())


@pytest.mark.parametrize(
    "case", [g for g in GOLDEN if "checksum" in g], ids=lambda g: str(g["seed"])
)
def test_golden_vectors(case: dict) -> None:
    idx, scale = ur.projection(case["seed"], case["total"], case["d"])
    assert idx.dtype == np.int32 and scale.dtype == np.float32
    assert idx[:12].tolist() == case["idx"]
    assert [hex(int(b)) for b in scale[:12].view(np.uint32)] == case["scale_bits"]
    assert ref.checksum(idx, scale) == case["checksum"]


def test_golden_vector_beyond_32_bits() -> None:
    case = next(g for g in GOLDEN if "rows" in g)
    d = case["d"]
    # Rows near the end of a D > 2^32 map, via reconstruct of a tiny trailing matrix
    # would need D floats; check the spec reference on the same rows instead and the
    # Rust core through its own test (rust/core/tests/projection.rs).
    rows = np.array(case["rows"], dtype=np.uint64)
    got = ref.permute(rows, case["seed"], case["total"]) % np.uint64(d)
    assert got.tolist() == case["idx"]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**64 - 1), total=st.integers(1, 30_000), frac=st.floats(0, 1))
def test_matches_reference_balanced_isometric(seed: int, total: int, frac: float) -> None:
    d = min(max(1, int(total * frac)), total)
    idx, scale = ur.projection(seed, total, d)
    ridx, rscale = ref.projection(seed, total, d)
    np.testing.assert_array_equal(idx, ridx)
    np.testing.assert_array_equal(scale.view(np.uint32), rscale.view(np.uint32))
    counts = np.bincount(idx, minlength=d)
    assert set(np.unique(counts)) <= {total // d, -(-total // d)}
    # P^T P x = x
    x = np.random.default_rng(seed % 2**32).standard_normal(d)
    px = x[idx] * scale.astype(np.float64)
    ptpx = np.zeros(d)
    np.add.at(ptpx, idx, px * scale)
    np.testing.assert_allclose(ptpx, x, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize(
    ("total", "d"), [(1, 1), (7, 1), (7, 7), (1 << 16, 1 << 16), ((1 << 16) + 1, 3), (1001, 1000)]
)
def test_edge_sizes_balanced(total: int, d: int) -> None:
    idx, scale = ur.projection(5, total, d)
    counts = np.bincount(idx, minlength=d)
    assert counts.min() == total // d and counts.max() == -(-total // d)
    np.testing.assert_array_equal(
        scale, (1.0 / np.sqrt(counts[idx].astype(np.float64))).astype(np.float32)
    )


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**64 - 1),
    shapes=st.lists(st.tuples(st.integers(1, 300), st.integers(1, 40)), min_size=1, max_size=6),
    frac=st.floats(0.001, 1.0),
)
def test_reconstruct_is_take_times_scale_bit_for_bit(seed: int, shapes: list, frac: float) -> None:
    total = sum(r * c for r, c in shapes)
    d = min(max(1, int(total * frac)), total)
    vector = np.random.default_rng(seed % 1000).uniform(-1, 1, d).astype(np.float32)
    mats = ur.reconstruct(vector, seed, shapes)
    idx, scale = ur.projection(seed, total, d)
    flat = vector[idx] * scale
    off = 0
    for m, (r, c) in zip(mats, shapes, strict=True):
        assert m.shape == (r, c) and m.dtype == np.float32 and m.flags.c_contiguous
        np.testing.assert_array_equal(
            m.view(np.uint32), flat[off : off + r * c].reshape(r, c).view(np.uint32)
        )
        off += r * c
    # the independent spec reference agrees too
    for m, rm in zip(mats, ref.reconstruct(vector, seed, shapes), strict=True):
        np.testing.assert_array_equal(m, rm)


def test_reconstruct_dict_keeps_names_and_order() -> None:
    shapes = {"layer.0.lora_B": (8, 2), "layer.0.lora_A": (2, 16), "head": (3, 3)}
    vector = np.linspace(-1, 1, 20, dtype=np.float32)
    out = ur.reconstruct(vector, 3, shapes)
    assert list(out) == list(shapes)
    as_list = ur.reconstruct(vector, 3, list(shapes.values()))
    for a, b in zip(out.values(), as_list, strict=True):
        np.testing.assert_array_equal(a, b)


def test_float64_and_noncontiguous_inputs_are_converted() -> None:
    base = np.random.default_rng(0).uniform(-1, 1, 64).astype(np.float32)
    want = ur.reconstruct(base, 9, [(10, 10)])[0]
    np.testing.assert_array_equal(ur.reconstruct(base.astype(np.float64), 9, [(10, 10)])[0], want)
    strided = np.zeros(128, dtype=np.float32)
    strided[::2] = base
    np.testing.assert_array_equal(ur.reconstruct(strided[::2], 9, [(10, 10)])[0], want)
    np.testing.assert_array_equal(ur.reconstruct(base.tolist(), 9, [(10, 10)])[0], want)


def test_same_result_for_one_and_two_threads() -> None:
    vector = np.random.default_rng(1).uniform(-1, 1, 23_040).astype(np.float32)
    shapes = [(4096, 4), (4, 4096)] * 20
    try:
        ur.set_num_threads(1)
        assert ur.get_num_threads() == 1
        one = ur.reconstruct(vector, 77, shapes)
        ur.set_num_threads(2)
        assert ur.get_num_threads() == 2
        two = ur.reconstruct(vector, 77, shapes)
    finally:
        ur.set_num_threads(0)
    for a, b in zip(one, two, strict=True):
        np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


def test_gil_is_released_during_reconstruct() -> None:
    """A Python thread keeps running while a large reconstruct is in progress."""
    vector = np.random.default_rng(2).uniform(-1, 1, 1 << 16).astype(np.float32)
    shapes = [(16_000_000, 4)]
    ticks: list[float] = []
    stop = threading.Event()

    def ticker() -> None:
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    th = threading.Thread(target=ticker)
    th.start()
    try:
        ur.set_num_threads(1)  # a longer call
        time.sleep(0.02)
        t0 = time.perf_counter()
        ur.reconstruct(vector, 1, shapes)
        t1 = time.perf_counter()
    finally:
        ur.set_num_threads(0)
        stop.set()
        th.join()
    assert t1 - t0 > 0.05, "the call was too short to tell"
    inside = [t for t in ticks if t0 + 0.2 * (t1 - t0) < t < t0 + 0.8 * (t1 - t0)]
    # Holding the GIL would allow no tick in the middle of the call.
    assert len(inside) >= 5, f"{len(inside)} ticks during a {t1 - t0:.3f}s call"


def test_fingerprint_matches_reference_and_depends_on_everything() -> None:
    shapes = {"m.lora_B": (8, 2), "m.lora_A": (2, 16)}
    fp = ur.fingerprint(5, 10, shapes)
    assert fp == ref.fingerprint(5, 10, [("m.lora_B", 8, 2), ("m.lora_A", 2, 16)])
    assert fp.startswith("sha256:") and len(fp) == 7 + 64
    assert ur.fingerprint(5, 10, [(8, 2), (2, 16)]) == ref.fingerprint(
        5, 10, [("0", 8, 2), ("1", 2, 16)]
    )
    others = {
        ur.fingerprint(6, 10, shapes),
        ur.fingerprint(5, 11, shapes),
        ur.fingerprint(5, 10, {"m.lora_B": (8, 2), "m.lora_A": (2, 15)}),
        ur.fingerprint(5, 10, {"n.lora_B": (8, 2), "m.lora_A": (2, 16)}),
        ur.fingerprint(5, 10, dict(reversed(shapes.items()))),
    }
    assert fp not in others and len(others) == 5


@pytest.mark.parametrize("name", ["a\t2\t2\nb", "a\nb", "x\r", "\x00", "q\x7f"])
def test_fingerprint_refuses_names_with_control_characters(name: str) -> None:
    """A name with a tab and a line break imitated two matrices: ``{'a\\t2\\t2\\nb':
    (2, 2)}`` had the fingerprint of ``{'a': (2, 2), 'b': (2, 2)}``. Names follow the
    rule of module names in adapter configs."""
    with pytest.raises(ur.InvalidArgumentError, match="control character") as info:
        ur.fingerprint(0, 2, {"ok": (1, 1), name: (2, 2)})
    message = str(info.value)
    assert "\n" not in message and "matrix" in message, message
    if name == "a\t2\t2\nb":
        assert "a\\t2\\t2\\nb" in message, message  # the bad name, escaped
    assert ur.fingerprint(0, 2, {"a b": (2, 2), "é.ü": (2, 2)}).startswith("sha256:")


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: ur.projection(0, 10, 0), ur.InvalidArgumentError, "must be at least 1"),
        (lambda: ur.projection(0, 10, 11), ur.InvalidArgumentError, "larger than the total"),
        (lambda: ur.projection(-1, 10, 1), ur.InvalidArgumentError, "seed"),
        (lambda: ur.projection(2**64, 10, 1), ur.InvalidArgumentError, "seed"),
        (
            lambda: ur.reconstruct(np.zeros(0, np.float32), 0, [(2, 2)]),
            ur.InvalidArgumentError,
            "must be at least 1",
        ),
        (
            lambda: ur.reconstruct(np.ones(5, np.float32), 0, [(2, 2)]),
            ur.InvalidArgumentError,
            "larger than the total",
        ),
        (
            lambda: ur.reconstruct(np.ones(2, np.float32), 0, []),
            ur.InvalidArgumentError,
            "shapes is empty",
        ),
        (
            lambda: ur.reconstruct(np.ones(2, np.float32), 0, {}),
            ur.InvalidArgumentError,
            "shapes is empty",
        ),
        (
            lambda: ur.reconstruct(np.ones(2, np.float32), 0, [(0, 4)]),
            ur.InvalidArgumentError,
            "at least 1",
        ),
        (
            lambda: ur.reconstruct(np.ones(2, np.float32), 0, [(-3, 4)]),
            ur.InvalidArgumentError,
            "at least 1",
        ),
        (
            lambda: ur.reconstruct(np.ones(2, np.float32), 0, [(2.5, 4)]),
            ur.InvalidArgumentError,
            "integers",
        ),
        (
            lambda: ur.reconstruct(np.ones(2, np.float32), 0, [(2, 4, 1)]),
            ur.InvalidArgumentError,
            "pair",
        ),
        (
            lambda: ur.reconstruct(np.ones(2, np.float32), 0, "abc"),
            ur.InvalidArgumentError,
            "list of",
        ),
        (
            lambda: ur.reconstruct(np.array([1.0, np.nan], np.float32), 0, [(2, 2)]),
            ur.VectorError,
            r"vector\[1\]",
        ),
        (
            lambda: ur.reconstruct(np.array([np.inf, 1.0]), 0, [(2, 2)]),
            ur.VectorError,
            "not finite",
        ),
        (lambda: ur.reconstruct(np.array([1e39, 1.0]), 0, [(2, 2)]), ur.VectorError, "not finite"),
        (lambda: ur.reconstruct(np.ones(4, np.int32), 0, [(2, 2)]), ur.DtypeError, "float32"),
        (lambda: ur.reconstruct(np.ones(4, np.float16), 0, [(2, 2)]), ur.DtypeError, "float16"),
        (
            lambda: ur.reconstruct(np.ones((2, 2), np.float32), 0, [(2, 2)]),
            ur.InvalidArgumentError,
            "1-D",
        ),
        (lambda: ur.fingerprint(0, 0, [(2, 2)]), ur.InvalidArgumentError, "d must be"),
    ],
)
def test_bad_input_raises_specific_errors(call, exc, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(exc, match=match) as info:
        call()
    assert isinstance(info.value, ur.UniLoraError)


def test_error_classes_derive_from_builtins() -> None:
    assert issubclass(ur.InvalidArgumentError, ValueError)
    assert issubclass(ur.VectorError, ValueError)
    assert issubclass(ur.DtypeError, TypeError)
    assert issubclass(ur.MismatchError, ValueError)


def test_version_matches_package_metadata() -> None:
    assert ur.__version__ == importlib.metadata.version("unilora_rs")
    assert ur.SPEC_VERSION == 1


def test_numpy_api_does_not_import_torch() -> None:
    code = "import sys, unilora_rs, unilora_rs.adapter; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_bench_cli_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "unilora_rs", "bench", "--layers", "2", "--d", "4096"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "equals theta_d[idx] * scale bit for bit:   True" in out.stdout
    assert "column use 19..20" not in out.stdout  # the 2-layer model has other counts
    assert "LoRA parameters D" in out.stdout


def test_cli_errors_are_one_line() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "unilora_rs", "bench", "--d", "0"], capture_output=True, text=True
    )
    assert out.returncode == 1
    assert out.stderr.startswith("unilora: error:") and out.stderr.count("\n") == 1


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**64 - 1), total=st.integers(1, 40_000), frac=st.floats(0, 1))
def test_backward_is_transpose_and_thread_independent(seed: int, total: int, frac: float) -> None:
    d = min(max(1, int(total * frac)), total)
    grad = np.random.default_rng(seed % 997).standard_normal(total).astype(np.float32)
    idx, scale = ur.projection(seed, total, d)
    want = np.zeros(d)
    np.add.at(want, idx, grad.astype(np.float64) * scale)
    try:
        ur.set_num_threads(1)
        one = ur.reconstruct_backward(grad, seed, d)
        ur.set_num_threads(2)
        two = ur.reconstruct_backward(grad, seed, d)
    finally:
        ur.set_num_threads(0)
    assert one.dtype == np.float32 and one.shape == (d,)
    np.testing.assert_array_equal(one.view(np.uint32), two.view(np.uint32))
    np.testing.assert_allclose(one, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("seed", "total", "d"),
    [
        (0, 1, 1),
        (3, 700, 9),
        (4, 640, 10),
        (5, 641, 10),
        (6, 20_000, 1),
        (7, 50_000, 777),
        (2**64 - 1, 4097, 4097),
        (8, 130_000, 3),
    ],
)
def test_backward_is_the_spec_order_bit_for_bit(seed: int, total: int, d: int) -> None:
    """Chunks of 64 t values, summed in order, then the chunk sums in order (SPEC 1.4)."""
    grad = np.random.default_rng(seed % 1000).standard_normal(total).astype(np.float32)
    want = ref.backward(grad, seed, d)
    for threads in (1, 2):
        try:
            ur.set_num_threads(threads)
            got = ur.reconstruct_backward(grad, seed, d)
        finally:
            ur.set_num_threads(0)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_backward_matches_adjoint_of_reconstruct() -> None:
    """<P x, g> == <x, P^T g> (the defining property of the backward pass)."""
    rng = np.random.default_rng(5)
    shapes = [(300, 4), (4, 500)]
    total, d = ur.total_size(shapes), 700
    x = rng.standard_normal(d).astype(np.float32)
    g = rng.standard_normal(total).astype(np.float32)
    px = np.concatenate([m.ravel() for m in ur.reconstruct(x, 3, shapes)])
    lhs = float(np.dot(px.astype(np.float64), g))
    rhs = float(np.dot(x.astype(np.float64), ur.reconstruct_backward(g, 3, d)))
    assert abs(lhs - rhs) <= 1e-4 * (1 + abs(lhs))


def test_backward_bad_input() -> None:
    with pytest.raises(ur.InvalidArgumentError, match="larger than the total"):
        ur.reconstruct_backward(np.ones(5, np.float32), 0, 6)
    with pytest.raises(ur.DtypeError):
        ur.reconstruct_backward(np.ones(5, np.int64), 0, 2)
    with pytest.raises(ur.InvalidArgumentError, match="1-D"):
        ur.reconstruct_backward(np.ones((5, 1), np.float32), 0, 2)


def test_impossible_allocations_raise_memory_error() -> None:
    # 4 PiB: beyond any address space, so the allocation fails on every system
    # (the process must not abort).
    with pytest.raises(MemoryError, match="cannot allocate"):
        ur.reconstruct(np.ones(4, np.float32), 0, [(2**50, 1)])
    with pytest.raises(MemoryError, match="cannot allocate"):
        ur.projection(0, 2**50, 4)


_FORK_SCRIPT = """
import os, warnings, numpy as np, unilora_rs as ur
warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (Python >= 3.12)
ur.set_num_threads(2)
v = np.linspace(-1, 1, 5000, dtype=np.float32)
want = ur.reconstruct(v, 3, [(200_000, 2)])[0]   # the parent's pool now has threads
pid = os.fork()
if pid == 0:
    got = ur.reconstruct(v, 3, [(200_000, 2)])[0]   # the child must build its own pool
    os._exit(0 if np.array_equal(got, want) else 3)
_, status = os.waitpid(pid, 0)
print("child exit", os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_parallel_work_after_fork() -> None:
    """A forked child gets a fresh thread pool instead of deadlocking on the parent's."""
    out = subprocess.run(
        [sys.executable, "-c", _FORK_SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "child exit 0"


_V = np.ones(4, np.float32)
_G = np.ones(8, np.float32)


@pytest.mark.parametrize(
    "call",
    [
        lambda: ur.reconstruct(_V, 0, [(2**64, 1)]),
        lambda: ur.reconstruct(_V, 0, [(1, 2**64 + 5)]),
        lambda: ur.reconstruct(_V, 0, [(2**63, 2**63)]),
        lambda: ur.reconstruct(_V, 0, [(2**63, 1), (2**63, 1)]),
        lambda: ur.reconstruct(_V, 2**64, [(2, 2)]),
        lambda: ur.reconstruct(_V, -1, [(2, 2)]),
        lambda: ur.reconstruct(_V, "0", [(2, 2)]),
        lambda: ur.reconstruct(_V, 1.5, [(2, 2)]),
        lambda: ur.reconstruct(_V, True, [(2, 2)]),
        lambda: ur.reconstruct(_V, 0, [("a", 2)]),
        lambda: ur.reconstruct(_V, 0, [None]),
        lambda: ur.reconstruct(_V, 0, None),
        lambda: ur.reconstruct(_V, 0, {"a": (2**64, 1)}),
        lambda: ur.reconstruct("abc", 0, [(2, 2)]),
        lambda: ur.reconstruct([[1.0]], 0, [(2, 2)]),
        lambda: ur.projection(0, 2**64, 1),
        lambda: ur.projection(0, 10, 2**70),
        lambda: ur.projection(0, 10.0, 1),
        lambda: ur.projection(0, 2**33, 2**32 + 1),
        lambda: ur.fingerprint(2**64, 1, [(1, 1)]),
        lambda: ur.fingerprint(0, 2**64, [(1, 1)]),
        lambda: ur.fingerprint(0, 1, {"m.lora_A": (4, 2**64 + 5)}),
        lambda: ur.total_size([(2**64, 1)]),
        lambda: ur.total_size([(2**40, 2**40)]),
        lambda: ur.reconstruct_backward(_G, 2**64, 1),
        lambda: ur.reconstruct_backward(_G, 0, 2**64),
        lambda: ur.reconstruct_backward(_G, 0, -1),
        lambda: ur.reconstruct_backward(_G.astype(np.int8), 0, 1),
        lambda: ur.set_num_threads(2**64),
        lambda: ur.set_num_threads(-1),
        lambda: ur.set_num_threads(10**6),
        lambda: ur.set_num_threads("2"),
        lambda: ur.reconstruct(_V, 0, [(2, 2)], out=[np.zeros((2, 2), np.float64)]),
        lambda: ur.reconstruct(_V, 0, [(2, 2)], out=[np.zeros((2, 3), np.float32)]),
        lambda: ur.reconstruct(_V, 0, [(2, 2)], out=[np.zeros(4, np.float32)]),
        lambda: ur.reconstruct(_V, 0, [(2, 2)], out=[]),
        lambda: ur.reconstruct(_V, 0, [(2, 2)], out=np.zeros((2, 2), np.float32)),
        lambda: ur.reconstruct(_V, 0, [(2, 2)], out=[np.zeros((2, 4), np.float32)[:, ::2]]),
        lambda: ur.reconstruct(_V, 0, [(2, 2)], out=[np.zeros((2, 2), np.float32)] * 2),
        lambda: ur.reconstruct(_V, 0, {"a": (2, 2)}, out={"b": np.zeros((2, 2), np.float32)}),
        lambda: ur.reconstruct(_V, 0, [(2, 2)], out=[_readonly((2, 2))]),
        lambda: ur.reconstruct(_V, 0, [(1, 4)], out=[_V.reshape(1, 4)]),
        lambda: ur.reconstruct(_V, 0, [(2, 2), (2, 2)], out=[_SHARED, _SHARED]),
    ],
)
def test_every_bad_input_raises_a_package_error(call) -> None:  # type: ignore[no-untyped-def]
    """Out-of-range integers, wrong types and bad out= buffers: never a bare
    OverflowError/TypeError, always a UniLoraError subclass with a message."""
    with pytest.raises(ur.UniLoraError) as info:
        call()
    assert str(info.value)


def _readonly(shape: tuple[int, int]) -> np.ndarray:
    a = np.zeros(shape, np.float32)
    a.flags.writeable = False
    return a


_SHARED = np.zeros((2, 2), np.float32)


def test_out_of_range_integers_name_the_argument() -> None:
    with pytest.raises(ur.InvalidArgumentError, match=r"shape #0 = \(18446744073709551616, 1\)"):
        ur.reconstruct(_V, 0, [(2**64, 1)])
    with pytest.raises(ur.InvalidArgumentError, match=r"seed must be in \[0, 2\*\*64 - 1\]"):
        ur.reconstruct(_V, 2**64, [(2, 2)])
    with pytest.raises(ur.InvalidArgumentError, match="seed must be an integer, got bool"):
        ur.reconstruct(_V, True, [(2, 2)])
    with pytest.raises(ur.InvalidArgumentError, match="overflows the total size"):
        ur.total_size([(2**40, 2**40)])
    # numpy integers are integers
    assert ur.total_size([(np.int64(3), np.uint8(2))]) == 6


def test_reconstruct_into_out_buffers() -> None:
    rng = np.random.default_rng(3)
    shapes = [(64, 4), (4, 96), (7, 7)]
    out = [np.full(s, np.nan, np.float32) for s in shapes]
    for _ in range(2):  # the same buffers, reused
        v = rng.uniform(-1, 1, 300).astype(np.float32)
        got = ur.reconstruct(v, 11, shapes, out=out)
        assert all(g is o for g, o in zip(got, out, strict=True))
        for g, want in zip(got, ref.reconstruct(v, 11, shapes), strict=True):
            np.testing.assert_array_equal(g, want)
    named = {"b": (64, 4), "a": (4, 96)}
    bufs = {"a": np.zeros((4, 96), np.float32), "b": np.zeros((64, 4), np.float32)}
    got_d = ur.reconstruct(v, 11, named, out=bufs)
    assert list(got_d) == ["b", "a"] and got_d["a"] is bufs["a"]
    np.testing.assert_array_equal(got_d["b"], ur.reconstruct(v, 11, named)["b"])


def test_thread_limit() -> None:
    assert ur.MAX_THREADS >= 256
    with pytest.raises(ur.InvalidArgumentError, match="limit"):
        ur.set_num_threads(ur.MAX_THREADS + 1)
    assert ur.get_num_threads() <= ur.MAX_THREADS


def test_thread_environment_variable_is_clamped_with_a_warning() -> None:
    code = (
        "import warnings, numpy as np\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import unilora_rs as ur\n"
        "print(ur.get_num_threads() == ur.MAX_THREADS, [str(x.message) for x in w])\n"
        "ur.reconstruct(np.ones(16, np.float32), 0, [(4, 4)])\n"
    )
    env = {**__import__("os").environ, "UNILORA_NUM_THREADS": "1000000"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("True") and "exceeds the limit" in out.stdout


def test_the_thread_warning_names_the_import_that_caused_it() -> None:
    """The warning was attributed to ``<frozen importlib._bootstrap>``; it names the
    line that imported unilora_rs, so a filter on the caller's module applies."""
    code = "import os\nimport unilora_rs\n"
    env = {**os.environ, "UNILORA_NUM_THREADS": "1000000", "PYTHONWARNINGS": "default"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr
    assert "importlib" not in out.stderr, out.stderr
    assert out.stderr.startswith("<string>:2: RuntimeWarning: UNILORA_NUM_THREADS=1000000 "), (
        out.stderr
    )
    assert out.stderr.count("\n") == 1, out.stderr
    # imported by the interpreter (python -m): the package's own line, not runpy's
    out = subprocess.run(
        [sys.executable, "-m", "unilora_rs", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert "<frozen" not in out.stderr and "RuntimeWarning: UNILORA_NUM_THREADS" in out.stderr
    assert out.stderr.split(":", 1)[0].endswith(os.path.join("unilora_rs", "__init__.py"))
