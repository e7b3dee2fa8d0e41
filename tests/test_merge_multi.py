"""Several adapters, one pass over the base: ``merge_each`` (one checkpoint per adapter,
equal byte for byte to separate merges) and ``merge_weighted`` (W + sum w_i dW_i,
equal to a numpy reference)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import unilora_rs as ur
from merge_helpers import (
    llama_like_tensors,
    llama_modules,
    lora_factors,
    raw_tensors,
    reference_delta,
    write_adapter,
    write_checkpoint,
)
from safetensors.torch import load_file
from unilora_rs.adapter import ModuleSpec
from unilora_rs.errors import InvalidArgumentError


def files_bytes(root: Path) -> dict[str, bytes]:
    if root.is_file():
        return {"": root.read_bytes()}
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def three_adapters(tmp: Path) -> list[Path]:
    """Adapters with different modules, ranks, seeds; one replaces lm_head (a head)."""
    mods = llama_modules()
    qv = [m for m in mods if m.name.endswith(("q_proj", "v_proj"))]
    mlp = [m for m in mods if ".mlp." in m.name]
    head = np.random.default_rng(3).normal(size=(64, 48)).astype(np.float32)
    write_adapter(tmp / "qv", qv, rank=4, alpha=8.0, d=300, seed=1)
    write_adapter(tmp / "all", mods, rank=2, alpha=2.0, d=700, seed=2)
    write_adapter(
        tmp / "mlp", mlp, rank=3, alpha=6.0, d=400, seed=3, extra={"lm_head.weight": head}
    )
    return [tmp / "qv", tmp / "all", tmp / "mlp"]


@pytest.mark.parametrize(("shards", "dtype"), [(3, None), (3, "bf16"), (1, None), (1, "f16")])
def test_each_output_equals_a_separate_merge(
    tmp_path: Path, shards: int, dtype: str | None
) -> None:
    sd = llama_like_tensors("bf16")
    base_path = tmp_path / ("base" if shards > 1 else "base.safetensors")
    base = write_checkpoint(base_path, sd, shards=shards)
    adapters = three_adapters(tmp_path)
    each = ur.merge_each(base, adapters, tmp_path / "each", dtype=dtype)
    separate_read = 0
    for adapter, result in zip(adapters, each.results, strict=True):
        name = adapter.name + ("" if shards > 1 else ".safetensors")
        alone = ur.merge(base, adapter, tmp_path / "alone" / name, dtype=dtype)
        separate_read += alone.bytes_read
        assert result.out == tmp_path / "each" / name
        assert files_bytes(result.out) == files_bytes(alone.out)
        assert result.merged == alone.merged and result.replaced == alone.replaced
    files = [base] if shards == 1 else sorted(base.glob("*.safetensors"))
    base_bytes = sum(len(t[2]) for f in files for t in raw_tensors(f)[1].values())
    # The base is read once for all three outputs (plus the one head of an adapter);
    # separate merges read it three times.
    assert each.bytes_read == base_bytes + 64 * 48 * 4
    # (A separate merge that replaces lm_head reads the adapter's head, not the base's.)
    base_head = 64 * 48 * sd["lm_head.weight"].element_size()
    assert separate_read == 3 * base_bytes - base_head + 64 * 48 * 4


def test_fastfood_adapters_merge_in_one_pass_as_alone(tmp_path: Path) -> None:
    base = write_checkpoint(tmp_path / "base", llama_like_tensors("f32"), shards=2)
    mods = llama_modules()
    write_adapter(tmp_path / "ff", mods, rank=2, d=500, seed=5, projection="fastfood")
    write_adapter(tmp_path / "sp", mods, rank=2, d=500, seed=5)
    adapters = [tmp_path / "ff", tmp_path / "sp"]
    each = ur.merge_each(base, adapters, tmp_path / "each")
    outs = []
    for adapter, result in zip(adapters, each.results, strict=True):
        alone = ur.merge(base, adapter, tmp_path / "alone" / adapter.name)
        assert files_bytes(result.out) == files_bytes(alone.out)
        outs.append(files_bytes(alone.out))
    # The projection is honoured: same seed and d, different maps, different weights.
    assert outs[0] != outs[1]


def test_each_refuses_duplicate_names_and_writes_nothing(tmp_path: Path) -> None:
    base = write_checkpoint(tmp_path / "base.safetensors", llama_like_tensors("f32"))
    a = tmp_path / "x" / "ad"
    b = tmp_path / "y" / "ad"
    write_adapter(a, llama_modules()[:2], d=64)
    write_adapter(b, llama_modules()[2:4], d=64)
    with pytest.raises(InvalidArgumentError, match="two adapters are named"):
        ur.merge_each(base, [a, b], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    bad = tmp_path / "bad"
    write_adapter(bad, [ModuleSpec("model.layers.0.nope", 48, 48)], d=64)
    with pytest.raises(ur.MismatchError):
        ur.merge_each(base, [a, bad], tmp_path / "out2")
    assert not (tmp_path / "out2").exists() or not any((tmp_path / "out2").iterdir())


def _weighted_reference(
    w: np.ndarray, terms: list[tuple[np.ndarray, np.ndarray, float, float]]
) -> np.ndarray:
    """``w + sum_i c_i acc_i`` in float32, in adapter order, ``c_i = f32(w_i) * f32(alpha/r)``."""
    out = w.astype(np.float32)
    for b, a, weight, scaling in terms:
        c = np.float32(weight) * np.float32(scaling)
        out = out + reference_delta(b, a, 1.0) * c
    return out


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_weighted_merge_equals_numpy_reference(tmp_path: Path, dtype: str) -> None:
    sd = llama_like_tensors(dtype)
    base = write_checkpoint(tmp_path / "base", sd, shards=2)
    adapters = three_adapters(tmp_path)
    weights = [0.7, -0.3, 1.25]
    result = ur.merge_weighted(base, adapters, weights, tmp_path / "out")
    assert result.replaced == ["lm_head.weight"]
    merged = {}
    for f in sorted((tmp_path / "out").glob("*.safetensors")):
        merged.update(load_file(str(f)))
    factors = []
    for adapter in adapters:
        cfg, theta, _ = ur.load_adapter(adapter)
        factors.append((cfg, lora_factors(cfg, theta)))
    for name, tensor in sd.items():
        key = name.removesuffix(".weight")
        terms = [
            (*pairs[key], weight, cfg.scaling)
            for (cfg, pairs), weight in zip(factors, weights, strict=True)
            if key in pairs
        ]
        if not terms:
            continue
        want32 = _weighted_reference(tensor.to(torch.float32).numpy(), terms)
        want = torch.from_numpy(want32).to(tensor.dtype)
        assert torch.equal(merged[name], want), name
    head = ur.load_adapter(adapters[2])[2]["lm_head.weight"]
    assert torch.equal(
        merged["lm_head.weight"], torch.from_numpy(head).to(sd["lm_head.weight"].dtype)
    )
    # Modules no adapter touches are copied.
    assert torch.equal(merged["model.norm.weight"], sd["model.norm.weight"])


def test_weighted_merge_of_one_adapter_with_weight_one_is_the_merge(tmp_path: Path) -> None:
    base = write_checkpoint(tmp_path / "base", llama_like_tensors("bf16"), shards=2)
    adapter = three_adapters(tmp_path)[1]
    one = ur.merge_weighted(base, [adapter], [1.0], tmp_path / "w")
    alone = ur.merge(base, adapter, tmp_path / "m")
    assert files_bytes(one.out) == files_bytes(alone.out)


def test_weighted_merge_refuses_two_heads(tmp_path: Path) -> None:
    base = write_checkpoint(tmp_path / "base.safetensors", llama_like_tensors("f32"))
    head = np.zeros((64, 48), dtype=np.float32)
    mods = llama_modules()
    write_adapter(tmp_path / "a", mods[:3], d=64, extra={"lm_head.weight": head})
    write_adapter(tmp_path / "b", mods[3:6], d=64, extra={"lm_head.weight": head + 1})
    with pytest.raises(InvalidArgumentError, match="one adapter only"):
        ur.merge_weighted(base, [tmp_path / "a", tmp_path / "b"], [0.5, 0.5], tmp_path / "o.st")
    with pytest.raises(InvalidArgumentError, match="one weight per adapter"):
        ur.merge_weighted(base, [tmp_path / "a", tmp_path / "b"], [0.5], tmp_path / "o.st")
    assert not (tmp_path / "o.st").exists()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "unilora_rs", *args], capture_output=True, text=True, check=False
    )


def test_cli_forms(tmp_path: Path) -> None:
    base = write_checkpoint(tmp_path / "base", llama_like_tensors("bf16"), shards=2)
    adapters = [str(p) for p in three_adapters(tmp_path)[:2]]
    proc = _cli("merge", str(base), *adapters, "--out-dir", str(tmp_path / "d"), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "2 checkpoints" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["all", "qv"]
    out = tmp_path / "w"
    proc = _cli("merge", str(base), *adapters, "--weights", "0.5", "0.5", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    proc = _cli("merge", str(base), *adapters, str(tmp_path / "x"))
    assert proc.returncode == 1
    assert "--out-dir" in proc.stderr and proc.stderr.count("\n") == 1
    proc = _cli("merge", str(base), *adapters, "--weights", "1", str(tmp_path / "x"))
    assert proc.returncode == 1 and "one weight per adapter" in proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("weight", [1e39, -1e39, float("inf"), float("nan"), "x"])
def test_weighted_merge_refuses_weights_that_are_not_finite_in_float32(
    tmp_path: Path, weight: object
) -> None:
    """1e39 is a finite double that overflows float32: it wrote Inf/NaN tensors."""
    base = write_checkpoint(tmp_path / "base.safetensors", llama_like_tensors("f32"))
    adapters = three_adapters(tmp_path)[:2]
    with pytest.raises(InvalidArgumentError, match=r"weight 1 (is|is not a number)"):
        ur.merge_weighted(base, adapters, [weight, 0.5], tmp_path / "o.st")  # type: ignore[list-item]
    assert not (tmp_path / "o.st").exists()
    ur.merge_weighted(base, adapters, [1e30, 0.0], tmp_path / "ok.st")  # finite in float32


@pytest.mark.parametrize(("weights", "dtype"), [([3e38, 3e38], None), ([1e34, 0.0], "f16")])
def test_a_merged_tensor_that_becomes_inf_is_refused_by_name(
    tmp_path: Path, weights: list[float], dtype: str | None
) -> None:
    """Weights finite in float32 whose sum overflows it (or the output dtype) wrote
    Inf/NaN into every adapted tensor, exit 0."""
    base = write_checkpoint(tmp_path / "base.safetensors", llama_like_tensors("f32"))
    adapters = three_adapters(tmp_path)[:2]
    out = tmp_path / "o.safetensors"
    with pytest.raises(InvalidArgumentError) as info:
        ur.merge_weighted(base, adapters, weights, out, dtype=dtype)
    message = str(info.value)
    assert re.search(r"merging makes model\.layers\.\d\.\S+\.weight \(", message), message
    assert "Inf or NaN" in message, message
    assert ("float16" in message) == (dtype == "f16"), message
    listing = ["all", "base.safetensors", "mlp", "qv"]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == listing
    argv = ["merge", str(base), *map(str, adapters), "--weights", *map(str, weights), str(out)]
    proc = _cli(*argv, *(["--dtype", dtype] if dtype else []), "--no-progress")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "Inf or NaN" in proc.stderr and not out.exists()
    # a base tensor that already holds Inf is no fault of the merge
    sd = llama_like_tensors("f32")
    name = "model.layers.0.self_attn.q_proj.weight"
    sd[name] = sd[name].clone()
    sd[name][0, 0] = float("inf")
    inf_base = write_checkpoint(tmp_path / "inf.safetensors", sd)
    ur.merge_weighted(inf_base, adapters, [0.5, 0.5], tmp_path / "ok.safetensors")


def test_cli_a_numeric_out_after_the_weights_is_named(tmp_path: Path) -> None:
    from unilora_rs.cli import main

    base = write_checkpoint(tmp_path / "base.safetensors", llama_like_tensors("f32"))
    adapters = [str(p) for p in three_adapters(tmp_path)[:2]]
    argv = ["merge", str(base), *adapters, "--weights", "0.5", "0.5"]
    proc = _cli(*argv, "1e3", "--no-progress")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "'1e3' after --weights is read as a weight; if it is OUT, write it as ./1e3" in (
        proc.stderr
    )
    out = tmp_path / "1e3.safetensors"
    assert main([*argv, f"{tmp_path}/1e3.safetensors", "--no-progress"]) == 0 and out.is_file()
    proc = _cli("merge", str(base), *adapters, "--weights", "1e39", "0.5", str(tmp_path / "big"))
    assert proc.returncode == 1 and "not a finite float32 number" in proc.stderr
    assert not (tmp_path / "big").exists()
