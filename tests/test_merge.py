"""The streaming merge against an independent numpy/torch reference, and every bad input."""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
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
    reference_merge,
    tree_hash,
    ulp_distance,
    write_adapter,
    write_checkpoint,
)
from safetensors.torch import load_file
from unilora_rs import _core
from unilora_rs.adapter import ModuleSpec

NP_OF = {"F32": np.float32, "F16": np.float16}


def to_f32(dtype: str, raw: bytes, shape: list[int]) -> np.ndarray:
    if dtype == "BF16":
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    return np.frombuffer(raw, dtype=NP_OF[dtype]).astype(np.float32).reshape(shape)


def files_of(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(path.glob("*.safetensors"))


def check_merge(
    base: Path,
    out: Path,
    adapter: Path,
    out_dtype: str | None = None,
    replaced: tuple[str, ...] = (),
) -> None:
    """Merged tensors equal the float32 reference rounded by torch (within one ULP as
    required; in fact bit for bit) and stay within the float32 error bound of a float64
    matmul reference; all other tensors are byte-identical."""
    config = ur.load_adapter_config(adapter)
    theta = load_file(str(adapter / "adapter_model.safetensors"))["theta_d"].numpy()
    factors = lora_factors(config, theta)
    kinds = {m.name: m.kind for m in config.modules}
    seen = set()
    for src, dst in zip(files_of(base), files_of(out), strict=True):
        assert src.name == dst.name or base.is_file()
        head_in, tin = raw_tensors(src)
        head_out, tout = raw_tensors(dst)
        assert list(tin) == list(tout)
        if out_dtype is None:
            assert head_in == head_out  # header and metadata unchanged
        meta_in = json.loads(head_in[8:]).get("__metadata__")
        assert json.loads(head_out[8:]).get("__metadata__") == meta_in
        ours = load_file(str(dst))
        for name, (dt, shape, raw) in tin.items():
            module = name.removesuffix(".weight")
            if name in replaced:
                continue
            if module not in factors:
                if out_dtype is None or dt not in ("F32", "F16", "BF16", "F64"):
                    assert tout[name][2] == raw, f"{name} changed"
                continue
            seen.add(module)
            b, a = factors[module]
            want32 = reference_merge(to_f32(dt, raw, shape), b, a, config.scaling, kinds[module])
            target = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[
                out_dtype or {"BF16": "bf16", "F16": "f16", "F32": "f32"}[dt]
            ]
            want = torch.from_numpy(want32).to(target)  # torch rounds to nearest even
            got = ours[name]
            assert got.dtype == target
            assert ulp_distance(got, want) <= 1, name  # the requirement
            assert torch.equal(got, want), name  # in fact: identical (same order, same RNE)
            # An independent float64 matmul reference: the float32 arithmetic and the one
            # final rounding stay within their error bound, relative to |W| + s |B| |A|.
            w64 = torch.from_numpy(to_f32(dt, raw, shape)).double()
            b64, a64 = torch.from_numpy(b).double(), torch.from_numpy(a).double()
            d64 = config.scaling * (b64 @ a64)
            mag = config.scaling * (b64.abs() @ a64.abs())
            if kinds[module] == "conv1d":
                d64, mag = d64.T, mag.T
            r = b.shape[1]
            unit = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[
                target
            ]
            bound = (unit + (r + 2) * 2.0**-24) * (w64.abs() + mag) + 2.0**-24
            assert bool(((got.double() - (w64 + d64)).abs() <= bound).all()), name
    assert seen == set(factors)


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    write_adapter(tmp_path / "adapter", llama_modules())
    return tmp_path / "adapter"


@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16"])
def test_single_file_merge_matches_reference(tmp_path: Path, adapter_dir: Path, dtype: str) -> None:
    base = write_checkpoint(tmp_path / "base.safetensors", llama_like_tensors(dtype))
    before = tree_hash(base)
    out = tmp_path / "merged.safetensors"
    result = ur.merge(base, adapter_dir, out)
    assert result.merged_count == len(llama_modules()) == 21
    assert result.tensors == len(llama_like_tensors(dtype))
    assert result.copied == result.tensors - 21
    assert {m.module for m in result.merged} == {m.name for m in llama_modules()}
    check_merge(base, out, adapter_dir)
    assert tree_hash(base) == before


@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16"])
def test_three_shard_folder(tmp_path: Path, adapter_dir: Path, dtype: str) -> None:
    base = write_checkpoint(tmp_path / "base", llama_like_tensors(dtype, seed=3), shards=3)
    before = tree_hash(base)
    out = tmp_path / "merged"
    result = ur.merge(base, adapter_dir, out, show_progress=True)
    assert result.merged_count == 21
    assert result.shards == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".unilora-output", *(p.name for p in base.iterdir())]
    )
    for name in ("model.safetensors.index.json", "config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes()
    check_merge(base, out, adapter_dir)
    assert tree_hash(base) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_dtype_cast(tmp_path: Path, adapter_dir: Path) -> None:
    base = write_checkpoint(tmp_path / "base", llama_like_tensors("bf16"), shards=3)
    out = tmp_path / "merged"
    result = ur.merge(base, adapter_dir, out, dtype="f32")
    sd_in = load_file(str(base / "model-00001-of-00003.safetensors"))
    assert result.cast == sum(1 for n in llama_like_tensors("bf16") if "proj" not in n) - 1
    sd = load_file(str(out / "model-00001-of-00003.safetensors"))
    assert sd["model.embed_tokens.weight"].dtype == torch.float32
    assert torch.equal(sd["model.embed_tokens.weight"], sd_in["model.embed_tokens.weight"].float())
    last = load_file(str(out / "model-00003-of-00003.safetensors"))
    assert last["model.position_ids"].dtype == torch.int64
    check_merge(base, out, adapter_dir, out_dtype="f32")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    sizes = sum(
        v.numel() * v.element_size()
        for p in out.glob("*.safetensors")
        for v in load_file(str(p)).values()
    )
    assert index["metadata"]["total_size"] == sizes


def test_conv1d_and_modules_to_save(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    sd = {
        "transformer.h.0.attn.c_attn.weight": torch.randn(32, 96, generator=g),  # [in, out]
        "transformer.h.0.mlp.c_fc.weight": torch.randn(32, 64, generator=g),
        "score.weight": torch.randn(3, 32, generator=g).to(torch.bfloat16),
    }
    base = write_checkpoint(tmp_path / "gpt.safetensors", sd)
    mods = [
        ModuleSpec("transformer.h.0.attn.c_attn", 32, 96, "conv1d"),
        ModuleSpec("transformer.h.0.mlp.c_fc", 32, 64, "conv1d"),
    ]
    new_score = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    write_adapter(tmp_path / "ad", mods, d=300, alpha=2.0, extra={"score.weight": new_score})
    result = ur.merge(base, tmp_path / "ad", tmp_path / "out.safetensors")
    assert result.merged_count == 2 and result.replaced == ["score.weight"]
    check_merge(base, tmp_path / "out.safetensors", tmp_path / "ad", replaced=("score.weight",))
    out = load_file(str(tmp_path / "out.safetensors"))
    assert out["score.weight"].dtype == torch.bfloat16
    assert torch.equal(out["score.weight"], torch.from_numpy(new_score).to(torch.bfloat16))


def test_thread_count_and_tiles_do_not_change_bytes(tmp_path: Path, adapter_dir: Path) -> None:
    base = write_checkpoint(tmp_path / "base.safetensors", llama_like_tensors("bf16"))
    outs = []
    try:
        for k, (threads, tile) in enumerate([(1, 0), (2, 0), (2, 5), (3, 1 << 12)]):
            ur.set_num_threads(threads)
            out = tmp_path / f"o{k}.safetensors"
            _core.merge(base, adapter_dir, out, tile_elems=tile)
            outs.append(out.read_bytes())
    finally:
        ur.set_num_threads(0)
    assert all(o == outs[0] for o in outs)


def test_suffix_matching(tmp_path: Path) -> None:
    sd = {k.removeprefix("model."): v for k, v in llama_like_tensors("f32").items()}
    base = write_checkpoint(tmp_path / "b.safetensors", sd)
    write_adapter(tmp_path / "ad", llama_modules())  # names carry "model."
    result = ur.merge(base, tmp_path / "ad", tmp_path / "o.safetensors")
    assert result.merged[0].tensor == "layers.0.self_attn.q_proj.weight"


def test_progress_callback_and_gil_release(tmp_path: Path, adapter_dir: Path) -> None:
    base = write_checkpoint(tmp_path / "base.safetensors", llama_like_tensors("f32"))
    calls: list[tuple[int, int]] = []
    _core.merge(
        base, adapter_dir, tmp_path / "o.safetensors", progress=lambda d, t: calls.append((d, t))
    )
    assert calls and calls[-1][0] == calls[-1][1] > 0
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(calls))

    # Another Python thread keeps running while a merge works (the GIL is released).
    ticks = 0
    done = threading.Event()

    def work() -> None:
        ur.set_num_threads(1)
        try:
            for k in range(5):
                _core.merge(base, adapter_dir, tmp_path / f"g{k}.safetensors", tile_elems=64)
        finally:
            ur.set_num_threads(0)
            done.set()

    t = threading.Thread(target=work)
    t.start()
    while not done.is_set():
        ticks += 1
    t.join()
    assert ticks > 1000


def test_callback_error_cancels_and_leaves_nothing(tmp_path: Path, adapter_dir: Path) -> None:
    base = write_checkpoint(tmp_path / "base", llama_like_tensors("bf16"), shards=3)

    calls = []

    def boom(done: int, total: int) -> None:
        calls.append(done)
        raise KeyboardInterrupt  # on the first call, right after the merge started

    with pytest.raises(KeyboardInterrupt):
        _core.merge(base, adapter_dir, tmp_path / "out", progress=boom)
    assert len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]


# ---------------------------------------------------------------- bad input


@pytest.fixture
def sharded(tmp_path: Path, adapter_dir: Path) -> tuple[Path, Path]:
    base = write_checkpoint(tmp_path / "base", llama_like_tensors("bf16"), shards=3)
    return base, adapter_dir


def expect_failure(
    tmp_path: Path, base: Path, adapter: Path, exc: type[BaseException], match: str, **kw: object
) -> None:
    before = tree_hash(base)
    listing = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(exc, match=match):
        ur.merge(base, adapter, tmp_path / "out", **kw)  # type: ignore[arg-type]
    assert tree_hash(base) == before, "the base was modified"
    assert sorted(p.name for p in tmp_path.iterdir()) == listing, "output or temp files left"


def shard1(base: Path) -> Path:
    return base / "model-00001-of-00003.safetensors"


def test_truncated_shard(tmp_path: Path, sharded: tuple[Path, Path]) -> None:
    base, adapter = sharded
    data = shard1(base).read_bytes()
    shard1(base).write_bytes(data[: len(data) - 10])
    expect_failure(tmp_path, base, adapter, ur.FormatError, "truncated")


def test_corrupt_header(tmp_path: Path, sharded: tuple[Path, Path]) -> None:
    base, adapter = sharded
    data = bytearray(shard1(base).read_bytes())
    data[8:14] = b"{{{{{{"
    shard1(base).write_bytes(bytes(data))
    expect_failure(tmp_path, base, adapter, ur.FormatError, "not valid JSON")


def test_header_size_bomb(tmp_path: Path, sharded: tuple[Path, Path]) -> None:
    base, adapter = sharded
    data = bytearray(shard1(base).read_bytes())
    data[:8] = (2**62).to_bytes(8, "little")
    shard1(base).write_bytes(bytes(data))
    expect_failure(tmp_path, base, adapter, ur.FormatError, "exceeds")
    data[:8] = (len(data) + 1).to_bytes(8, "little")
    shard1(base).write_bytes(bytes(data))
    expect_failure(tmp_path, base, adapter, ur.FormatError, "past the end of the file")


def test_overlapping_offsets(tmp_path: Path, sharded: tuple[Path, Path]) -> None:
    base, adapter = sharded
    blob = shard1(base).read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    names = [k for k in header if k != "__metadata__"]
    b0, b1 = header[names[1]]["data_offsets"]
    header[names[1]]["data_offsets"] = [b0 - 2, b1 - 2]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (n - len(text))
    assert len(text) == n
    shard1(base).write_bytes(blob[:8] + text + blob[8 + n :])
    expect_failure(tmp_path, base, adapter, ur.FormatError, "overlap")


@pytest.mark.parametrize(
    "bad", ["../evil.safetensors", "/etc/passwd", "sub/../../evil.safetensors"]
)
def test_index_path_traversal(tmp_path: Path, sharded: tuple[Path, Path], bad: str) -> None:
    base, adapter = sharded
    index_path = base / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = bad
    index_path.write_text(json.dumps(index))
    (tmp_path / "evil.safetensors").write_bytes(shard1(base).read_bytes())
    expect_failure(tmp_path, base, adapter, ur.FormatError, "inside the model folder")


def test_shape_mismatch(tmp_path: Path, sharded: tuple[Path, Path]) -> None:
    base, _ = sharded
    mods = [ModuleSpec("model.layers.0.mlp.down_proj", 48, 80)]  # in/out swapped
    write_adapter(tmp_path / "ad", mods, d=64)
    expect_failure(tmp_path, base, tmp_path / "ad", ur.MismatchError, "shape")


def test_missing_and_ambiguous_targets(tmp_path: Path, sharded: tuple[Path, Path]) -> None:
    base, _ = sharded
    write_adapter(tmp_path / "ad", [ModuleSpec("model.layers.7.mlp.down_proj", 80, 48)], d=64)
    expect_failure(tmp_path, base, tmp_path / "ad", ur.MismatchError, "has no tensor")
    shutil.rmtree(tmp_path / "ad")
    write_adapter(tmp_path / "ad", [ModuleSpec("self_attn.q_proj", 48, 48)], d=64)
    expect_failure(tmp_path, base, tmp_path / "ad", ur.MismatchError, "ambiguous")


def test_fingerprint_tampering(tmp_path: Path, sharded: tuple[Path, Path]) -> None:
    base, adapter = sharded
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["seed"] += 1
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    expect_failure(tmp_path, base, adapter, ur.MismatchError, "fingerprint mismatch")


def test_unknown_dtype(tmp_path: Path, sharded: tuple[Path, Path]) -> None:
    base, adapter = sharded
    expect_failure(tmp_path, base, adapter, ur.DtypeError, "bf16, f16, f32", dtype="int4")


def test_output_overlapping_inputs(tmp_path: Path, sharded: tuple[Path, Path]) -> None:
    base, adapter = sharded
    before = tree_hash(base)
    for out in (base, base / "sub", adapter, adapter / "x"):
        with pytest.raises(ur.InvalidArgumentError):
            ur.merge(base, adapter, out, overwrite=True)
    with pytest.raises(ur.InvalidArgumentError, match="contains"):
        ur.merge(base, adapter, tmp_path, overwrite=True)
    assert tree_hash(base) == before
    assert not (base / "sub").exists()


def test_existing_output_needs_overwrite(tmp_path: Path, sharded: tuple[Path, Path]) -> None:
    base, adapter = sharded
    out = tmp_path / "out"
    ur.merge(base, adapter, out)
    (out / "config.json").write_text("{}")
    with pytest.raises(FileExistsError):
        ur.merge(base, adapter, out)
    assert (out / "config.json").read_text() == "{}"
    ur.merge(base, adapter, out, overwrite=True)
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_missing_base(tmp_path: Path, adapter_dir: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ur.merge(tmp_path / "nope", adapter_dir, tmp_path / "out")


@pytest.fixture
def tiny_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk(tmp_path: Path, adapter_dir: Path, tiny_disk: Path) -> None:
    base = write_checkpoint(tmp_path / "base", llama_like_tensors("f32"), shards=3)  # ~400 KB
    before = tree_hash(base)
    with pytest.raises(OSError) as info:
        ur.merge(base, adapter_dir, tiny_disk / "out")
    assert info.value.errno == errno.ENOSPC
    assert list(tiny_disk.iterdir()) == []
    assert tree_hash(base) == before


# ---------------------------------------------------------------- what a model folder means


def _tiny_llama_setup(tmp_path: Path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """A Uni-LoRA adapter on a tiny Llama, and the logits with and without it."""
    pytest.importorskip("transformers")
    from tiny_models import tiny_llama
    from unilora_rs.torch import UniLoRAConfig, get_unilora_model

    cfg = UniLoRAConfig(
        rank=4, vector_length=256, target_modules=["q_proj", "v_proj"], init_range=0.3
    )
    model = get_unilora_model(tiny_llama(), cfg).eval()
    model.save_pretrained(tmp_path / "adapter")
    x = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(x).logits
        plain = tiny_llama().eval()(x).logits
    assert (want - plain).abs().max() > 1e-3
    return tmp_path / "adapter", x, want


def _loaded_logits(folder: Path, x: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(x).logits  # type: ignore[no-any-return]


def _sharded_with_stale_single_file(tmp_path: Path) -> Path:
    """``cp base/model.safetensors sharded/``: shards + index, and a single file too."""
    from tiny_models import tiny_llama

    base = tmp_path / "sharded"
    tiny_llama().save_pretrained(base, max_shard_size="40KB")
    assert (base / "model.safetensors.index.json").exists()
    tiny_llama().save_pretrained(tmp_path / "single")
    shutil.copy(tmp_path / "single" / "model.safetensors", base / "model.safetensors")
    return base


def test_folder_with_single_file_and_index_merges_what_transformers_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from unilora_rs.cli import main

    adapter, x, want = _tiny_llama_setup(tmp_path)
    base = _sharded_with_stale_single_file(tmp_path)
    before = tree_hash(base)
    with pytest.warns(ur.UniLoraWarning, match="transformers loads model.safetensors"):
        result = ur.merge(base, adapter, tmp_path / "out")
    assert result.shards == ["model.safetensors"]
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert not list((tmp_path / "out").glob("model-*.safetensors"))
    torch.testing.assert_close(_loaded_logits(tmp_path / "out", x), want, atol=1e-5, rtol=0)
    assert tree_hash(base) == before

    # The command line says so on stderr and still succeeds.
    capsys.readouterr()
    assert main(["merge", str(base), str(adapter), str(tmp_path / "out2"), "--no-progress"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("unilora: warning:"), err
    assert "transformers loads model.safetensors" in err[0]


def test_folder_follows_transformers_weights_in_config(tmp_path: Path) -> None:
    adapter, x, want = _tiny_llama_setup(tmp_path)
    base = _sharded_with_stale_single_file(tmp_path)
    cfg = json.loads((base / "config.json").read_text())
    cfg["transformers_weights"] = "model.safetensors.index.json"
    (base / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(ur.UniLoraWarning, match="not copied"):
        result = ur.merge(base, adapter, tmp_path / "out")
    assert "model.safetensors" not in result.shards and len(result.shards) > 1
    assert not (tmp_path / "out" / "model.safetensors").exists()
    torch.testing.assert_close(_loaded_logits(tmp_path / "out", x), want, atol=1e-5, rtol=0)

    shutil.rmtree(tmp_path / "out")
    cfg["transformers_weights"] = "../elsewhere.safetensors"
    (base / "config.json").write_text(json.dumps(cfg))
    expect_failure(tmp_path, base, adapter, ur.FormatError, "inside the model folder")


# ---------------------------------------------------------------- replacing an output


def test_overwrite_replaces_only_an_earlier_output(
    tmp_path: Path, sharded: tuple[Path, Path]
) -> None:
    base, adapter = sharded
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an earlier output"):
        ur.merge(base, adapter, out, overwrite=True)
    with pytest.raises(FileExistsError, match="not an earlier output"):
        ur.export_lora(adapter, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"

    empty = tmp_path / "empty"
    empty.mkdir()
    ur.merge(base, adapter, empty, overwrite=True)  # nothing to lose
    first = tree_hash(empty)
    ur.merge(base, adapter, empty, overwrite=True)  # an earlier output of ours
    assert tree_hash(empty) == first
    lora = tmp_path / "lora"
    ur.export_lora(adapter, lora)
    ur.export_lora(adapter, lora, overwrite=True)
    with pytest.raises(FileExistsError, match="not an earlier output"):
        ur.merge(base, adapter, lora, overwrite=True)  # ours, but another kind of output
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_missing_parent_folders_of_the_output_are_created(
    tmp_path: Path, sharded: tuple[Path, Path]
) -> None:
    base, adapter = sharded
    ur.merge(base, adapter, tmp_path / "a" / "b" / "out")
    ur.export_lora(adapter, tmp_path / "c" / "lora")
    assert (tmp_path / "a" / "b" / "out" / "config.json").exists()
    assert (tmp_path / "c" / "lora" / "adapter_config.json").exists()


# ---------------------------------------------------------------- interrupted runs


def _dead_pid() -> int:
    r = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(r.stdout)


def test_stale_temp_outputs_of_dead_processes_are_removed(
    tmp_path: Path, sharded: tuple[Path, Path]
) -> None:
    base, adapter = sharded
    dead = _dead_pid()
    stale_dir = tmp_path / f".out.unilora-tmp-{dead}-0"
    stale_dir.mkdir()
    (stale_dir / "model-00001-of-00003.safetensors").write_bytes(b"\0" * 4096)
    stale_file = tmp_path / f".out.unilora-tmp-{dead}-3"
    stale_file.write_bytes(b"\0" * 100)
    live = tmp_path / f".out.unilora-tmp-{os.getpid()}-12345"  # a running process's
    live.mkdir()
    other = [tmp_path / ".out.unilora-tmp-x-0", tmp_path / f".other.unilora-tmp-{dead}-0"]
    for p in other:
        p.mkdir()
    an_hour_ago = time.time() - 3600
    for p in [*stale_dir.iterdir(), stale_dir, stale_file, live, *other]:
        os.utime(p, (an_hour_ago, an_hour_ago))
    # Written to a minute ago: perhaps by a process this one cannot see; kept.
    recent = tmp_path / f".out.unilora-tmp-{dead}-4"
    recent.mkdir()
    ur.merge(base, adapter, tmp_path / "out")
    assert not stale_dir.exists() and not stale_file.exists()
    assert live.exists() and recent.exists() and all(p.exists() for p in other)


# The command line, with every merge made slow (tiles of 4 elements), so that a signal
# surely comes while it runs.
SLOW_CLI = """
import sys
import unilora_rs._core as core
from unilora_rs.cli import main
fast = core.merge
core.merge = lambda *args, **kw: fast(*args, **kw, tile_elems=4)
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process ids via /proc")
@pytest.mark.parametrize("reaped", [True, False], ids=["waited-for", "zombie"])
def test_staging_of_a_killed_merge_goes_on_the_next_run(tmp_path: Path, reaped: bool) -> None:
    """A SIGKILLed merge left its full-size staging folder, and the next runs into the
    same output (--overwrite included) kept it while it was younger than a minute, or
    for as long as the killed process was a zombie. A staging folder of a running
    process stays."""
    n, layers = 1024, 8
    sd = {f"layers.{k}.proj.weight": torch.zeros(n, n) for k in range(layers)}
    base = write_checkpoint(tmp_path / "base", sd, shards=2)
    write_adapter(tmp_path / "ad", [ModuleSpec("layers.0.proj", n, n)])
    out = tmp_path / "out"
    env = dict(os.environ, UNILORA_NUM_THREADS="1")
    cmd = [sys.executable, "-c", SLOW_CLI, "merge", str(base), str(tmp_path / "ad"), str(out)]
    proc = subprocess.Popen([*cmd, "--dtype", "bf16"], stderr=subprocess.PIPE, env=env)
    assert proc.stderr is not None
    proc.stderr.read(1)  # the progress bar has started: the staging folder exists
    proc.kill()
    if reaped:
        proc.wait()
    else:  # SIGKILL is delivered asynchronously: wait until the process is a zombie
        stat = Path(f"/proc/{proc.pid}/stat")
        deadline = time.monotonic() + 30
        while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, stat.read_text()
            time.sleep(0.01)
    try:
        (staging,) = tmp_path.glob(".out.unilora-tmp-*")
        assert staging.is_dir() and any(staging.iterdir())
        host = staging.name.rsplit("-", 1)[1]  # this machine's tag, as the merge wrote it
        live = tmp_path / f".out.unilora-tmp-{os.getpid()}-999-{host}"
        live.mkdir()
        ur.merge(base, tmp_path / "ad", out)
        assert not staging.exists()
        ur.merge(base, tmp_path / "ad", out, overwrite=True)
        assert live.exists()
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == [live.name, "ad", "base", "out"]
    finally:
        proc.wait()
        proc.stderr.close()


def test_sigterm_mid_merge_cleans_up_like_ctrl_c(tmp_path: Path) -> None:
    n, layers = 1024, 8  # 32 MB of float32, cast to bf16 in tiles of 4 elements
    sd = {f"layers.{k}.proj.weight": torch.zeros(n, n) for k in range(layers)}
    base = write_checkpoint(tmp_path / "base", sd, shards=2)
    write_adapter(tmp_path / "ad", [ModuleSpec("layers.0.proj", n, n)])
    env = dict(os.environ, UNILORA_NUM_THREADS="1")
    cmd = [sys.executable, "-c", SLOW_CLI, "merge", str(base), str(tmp_path / "ad")]
    proc = subprocess.Popen(
        [*cmd, str(tmp_path / "out"), "--dtype", "bf16"],
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert proc.stderr is not None
    proc.stderr.read(1)  # the progress bar has started: the merge is running
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "unilora: terminated" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "base"]
