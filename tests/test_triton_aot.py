"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90, without a GPU.

Each kernel is bound with the exact arguments its launch site passes (the launch
helpers of ``triton_kernels`` build them for fake tensors), compiled to PTX and cubin
with the ptxas shipped in the Triton wheel, and checked: no compile error, no register
spills, no atomics, the 32-bit path without 64-bit division. The specialisation keys of
several seeds and sizes are compared: one compiled forward and one backward serve every
adapter of a width class. Skips only when the installed Triton cannot target CUDA.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")

try:
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    make_backend(GPUTarget("cuda", 90, 32))
except Exception as err:  # pragma: no cover - depends on the installed Triton
    pytest.skip(f"the installed Triton cannot target CUDA: {err}", allow_module_level=True)

from unilora_rs.torch import triton_kernels as T  # noqa: E402
from unilora_rs.torch.params import ProjectionParams  # noqa: E402

ARCHS = (80, 90)

# (seed, D, d): small and large 32-bit domains, and domains above 32 bits (D > 2^32,
# d = 1, d = 2^32) that take the WIDE path.
PROJECTIONS = [
    (0, 1000, 37),
    (2**64 - 1, 1, 1),
    (3, 100_000_000, 2**17),
    (5, 2**32, 10_000),
    (7, 5_000_000_000, 524_288),
    (8, 5_000_000_000, 1),
    (9, 2**33, 2**32),
]


def _launches(p: ProjectionParams) -> list[tuple[Any, tuple, dict]]:
    """``(kernel, args, meta)`` of every launch for ``p``, from the launch helpers."""
    f32 = torch.empty(4, dtype=torch.float32)
    prm = torch.empty(4, dtype=torch.int64)
    kernel, _, args, meta = T.forward_launch(f32, f32, prm, p)
    out = [(kernel, args, meta)]
    out += [(k, a, m) for k, _, a, m in T.backward_launches(f32, f32, f32, prm, p)]
    return out


def _bind(kernel: Any, args: tuple, meta: dict, arch: int) -> tuple[str, Any, Any]:
    """What ``JITFunction.run`` would compile: its cache key and the compile inputs."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(meta)
    bound, spec, options = binder(*args, **kwargs)
    key = f"{kernel.fn.__name__}:{spec}:{options}"
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, options)
    return key, ASTSource(kernel, signature, constexprs, attrs), options


@cache
def _compiled(key: str, arch: int) -> tuple[str, str]:
    """(ptx, ptxas log) of the launch with cache key ``key`` (compiled once per arch)."""
    kernel, args, meta = _BY_KEY[arch][key]
    _, src, options = _bind(kernel, args, meta, arch)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options.__dict__)
    ptx = compiled.asm["ptx"]
    assert compiled.asm["cubin"], "no cubin"
    gpu = re.search(r"^\.target (\S+)", ptx, re.MULTILINE)
    assert gpu is not None
    with tempfile.TemporaryDirectory() as tmp:
        src_path = Path(tmp) / "k.ptx"
        src_path.write_text(ptx)
        log = subprocess.run(
            [
                get_ptxas(arch).path,
                "-v",
                f"--gpu-name={gpu.group(1)}",
                str(src_path),
                "-o",
                str(Path(tmp) / "k.cubin"),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    return ptx, log


_BY_KEY: dict[int, dict[str, tuple[Any, tuple, dict]]] = {}


def _keys(arch: int) -> dict[str, list[tuple[int, int, int]]]:
    """Distinct cache keys of all launches of all projections -> the projections."""
    keys: dict[str, list[tuple[int, int, int]]] = {}
    table = _BY_KEY.setdefault(arch, {})
    for case in PROJECTIONS:
        p = ProjectionParams.create(*case)
        for kernel, args, meta in _launches(p):
            key, _, _ = _bind(kernel, args, meta, arch)
            table.setdefault(key, (kernel, args, meta))
            keys.setdefault(key, []).append(case)
    return keys


@pytest.mark.parametrize("arch", ARCHS)
def test_one_compiled_kernel_per_width_class(arch: int) -> None:
    """Seeds, D and d never enter a kernel's signature: the forward and the backward
    chunk kernel compile once for 32-bit domains and once for wider ones; the sum kernel
    once."""
    keys = _keys(arch)
    by_kernel: dict[str, int] = {}
    for key in keys:
        name = key.split(":")[0]
        by_kernel[name] = by_kernel.get(name, 0) + 1
    assert by_kernel == {
        "_forward_kernel": 2,
        "_backward_chunk_kernel": 2,
        "_backward_sum_kernel": 1,
    }, by_kernel
    narrow = [c for c in PROJECTIONS if ProjectionParams.create(*c).narrow]
    assert len(narrow) == 4
    for key, cases in keys.items():
        if "_sum_" not in key:
            wide = "('constexpr', True)" in key
            assert cases == [c for c in PROJECTIONS if (c in narrow) != wide], key


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_compiles_without_spills(arch: int) -> None:
    for key in _keys(arch):
        ptx, log = _compiled(key, arch)
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
        assert spills, log
        assert all(s == ("0", "0") for s in spills), f"{key}: register spills\n{log}"
        assert not re.search(r"^\s*(atom|red)\.", ptx, re.MULTILINE), f"{key}: atomics"
        name = key.split(":")[0]
        wide = "('constexpr', True)" in key
        if name == "_forward_kernel":
            # mod d: multiply-high on 32-bit lanes, 64-bit remainder only on the wide path
            assert ("rem.u64" in ptx) == wide, key
            assert ("mul.hi.u32" in ptx) == (not wide), key


def test_grid_limits_are_refused_with_a_clear_error() -> None:
    from unilora_rs.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="more than one launch covers"):
        T.forward_grid(ProjectionParams.create(0, 2**62, 1))
    with pytest.raises(InvalidArgumentError, match="more than one launch covers"):
        T.backward_grids(ProjectionParams.create(0, 2**40, 1))
    big = ProjectionParams.create(0, 2**62, 1)
    with pytest.raises(InvalidArgumentError, match="more than one launch covers"):
        T.rebuild_forward(torch.zeros(1), big)
    with pytest.raises(InvalidArgumentError, match="more than one launch covers"):
        T.rebuild_backward(torch.zeros(1), ProjectionParams.create(0, 2**40, 1))
    # the largest D one forward launch covers
    limit = T.MAX_GRID * T.FWD_LANES * T.FWD_ROWS
    assert T.forward_grid(ProjectionParams.create(0, limit, 2**20)) == (T.MAX_GRID,)
    with pytest.raises(InvalidArgumentError):
        T.forward_grid(ProjectionParams.create(0, limit + 1, 2**20))
