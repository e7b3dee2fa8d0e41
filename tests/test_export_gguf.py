"""export-gguf against llama.cpp's own convert_lora_to_gguf.py (run on export-lora's
output), tensor for tensor and key for key; projections; saved modules; errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import unilora_rs as ur
from fault_helpers import cli_with_file_size_limit
from llamacpp_helpers import run_converter
from merge_helpers import lora_factors, write_adapter
from unilora_rs.adapter import AdapterConfig, ModuleSpec, ProjectionMap, save_adapter
from unilora_rs.cli import main

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

torch.set_num_threads(1)

# The adapter folders of both paths share this name: the converter derives general.name
# from the PEFT folder's name, export-gguf from the Uni-LoRA adapter's.
NAME = "tiny-adapter"


def tiny_base(arch: str) -> Any:
    common: dict[str, Any] = {"vocab_size": 64, "max_position_embeddings": 64}
    llama_like = {
        **common,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    configs = {
        "llama": lambda: transformers.LlamaConfig(**llama_like, tie_word_embeddings=False),
        "mistral": lambda: transformers.MistralConfig(**llama_like),
        "qwen2": lambda: transformers.Qwen2Config(**llama_like),
        "gemma": lambda: transformers.GemmaConfig(**llama_like, head_dim=8),
        "phi3": lambda: transformers.Phi3Config(
            **llama_like, pad_token_id=0, bos_token_id=0, eos_token_id=0
        ),
        "gpt2": lambda: transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4),
    }
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(configs[arch]()).eval()


def adapted_modules(model: Any, *, head: bool = False) -> list[ModuleSpec]:
    from transformers.pytorch_utils import Conv1D

    specs = []
    for name, mod in model.named_modules():
        if name == "lm_head" and not head:
            continue
        if isinstance(mod, torch.nn.Linear):
            specs.append(ModuleSpec(name, mod.in_features, mod.out_features, "linear"))
        elif isinstance(mod, Conv1D):
            fan_in, fan_out = mod.weight.shape
            specs.append(ModuleSpec(name, fan_in, fan_out, "conv1d"))
    return specs


def fields(path: Path) -> dict[str, Any]:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}


def tensors(path: Path) -> list[tuple[str, str, list[int], np.ndarray]]:
    reader = gguf.GGUFReader(path)
    return [(t.name, t.tensor_type.name, list(t.shape), np.array(t.data)) for t in reader.tensors]


def converter_gguf(tmp: Path, base: Path, uni: Path, outtype: str) -> Path:
    """export-lora, then llama.cpp's convert_lora_to_gguf.py on its output."""
    lora = tmp / "peft" / NAME
    if not lora.exists():
        ur.export_lora(uni, lora)
    out = tmp / f"converter-{outtype}.gguf"
    done = run_converter(
        "convert_lora_to_gguf.py", "--base", base, "--outtype", outtype, "--outfile", out, lora
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def setup(tmp: Path, arch: str, **kw: Any) -> tuple[Path, Path, AdapterConfig, np.ndarray]:
    model = tiny_base(arch)
    base = tmp / "base"
    model.save_pretrained(base)
    modules = adapted_modules(model, head=kw.pop("head", False))
    d = ur.total_size({m.name: (m.out_features + m.in_features, 4) for m in modules}) // 8
    uni = tmp / "uni" / NAME
    config, theta = write_adapter(uni, modules, rank=4, alpha=6.0, d=d, **kw)
    return base, uni, config, theta


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma", "phi3"])
def test_equals_converter(tmp_path: Path, arch: str) -> None:
    base, uni, config, theta = setup(tmp_path, arch, head=arch == "llama")
    want = converter_gguf(tmp_path, base, uni, "f32")
    ours = tmp_path / "ours.gguf"
    assert main(["export-gguf", str(uni), str(ours), "--base", str(base), "--no-progress"]) == 0
    assert fields(ours) == fields(want)
    assert fields(ours)["general.type"] == "adapter" and fields(ours)["adapter.type"] == "lora"
    assert fields(ours)["adapter.lora.alpha"] == 6.0
    got, ref = tensors(ours), tensors(want)
    assert [t[:3] for t in got] == [t[:3] for t in ref]
    for (name, _, _, a), (_, _, _, b) in zip(got, ref, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b), name  # max difference 0
    # And against the factors rebuilt independently of both (numpy reference above the
    # projection): A as is, B with the converter's q/k permutation for Llama / Mistral.
    factors = lora_factors(config, theta)
    by_name = {name: a for name, _, _, a in got}
    if arch == "phi3":  # q, k and v in one fused projection, as llama.cpp has them
        b, a = factors["model.layers.0.self_attn.qkv_proj"]
        assert np.array_equal(by_name["blk.0.attn_qkv.weight.lora_a"], a)
        assert np.array_equal(by_name["blk.0.attn_qkv.weight.lora_b"], b)
        b, a = factors["model.layers.0.mlp.gate_up_proj"]
        assert np.array_equal(by_name["blk.0.ffn_up.weight.lora_b"], b)
        return
    b, a = factors["model.layers.0.self_attn.q_proj"]
    assert np.array_equal(by_name["blk.0.attn_q.weight.lora_a"], a)
    if arch in ("llama", "mistral"):
        assert not np.array_equal(by_name["blk.0.attn_q.weight.lora_b"], b)
        heads = b.reshape(4, 2, 4, 4).swapaxes(1, 2).reshape(32, 4)
        assert np.array_equal(by_name["blk.0.attn_q.weight.lora_b"], heads)
    else:
        assert np.array_equal(by_name["blk.0.attn_q.weight.lora_b"], b)
    if arch == "llama":
        assert "output.weight.lora_a" in by_name  # lm_head


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_outtypes_equal_converter(tmp_path: Path, outtype: str) -> None:
    base, uni, _, _ = setup(tmp_path, "llama")
    want = converter_gguf(tmp_path, base, uni, outtype)
    ours = tmp_path / "ours.gguf"
    result = ur.export_gguf(uni, ours, base=base, outtype=outtype)
    assert fields(ours) == fields(want)
    got, ref = tensors(ours), tensors(want)
    assert [t[:3] for t in got] == [t[:3] for t in ref]
    for (name, _, _, a), (_, _, _, b) in zip(got, ref, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    if outtype == "q8_0":  # rows not a multiple of 32 fall back to F16, as in the converter:
        # every B (r = 4 columns) and the A of down_proj (48 columns)
        assert result.tensor_types == {"Q8_0": 12, "F16": 16}


def test_gpt2_keeps_the_linear_orientation(tmp_path: Path) -> None:
    """The converter transposes GPT-2's Conv1D LoRA factors like the Conv1D weights,
    though PEFT stores them as a linear layer's (A: r x in, B: out x r); llama.cpp then
    finds factors of the wrong shape. export-gguf writes A and B as they are: the
    converter's tensors transposed and swapped, same names and metadata."""
    base, uni, config, theta = setup(tmp_path, "gpt2")
    want = converter_gguf(tmp_path, base, uni, "f32")
    ours = tmp_path / "ours.gguf"
    ur.export_gguf(uni, ours, base=base)
    assert fields(ours) == fields(want)
    got = {name: data for name, _, _, data in tensors(ours)}
    ref = {name: data for name, _, _, data in tensors(want)}
    assert list(got) == list(ref)
    for name in got:
        if name.endswith(".lora_a"):
            other = name[: -len("a")] + "b"
            assert np.array_equal(got[name], ref[other].T), name
            assert np.array_equal(got[other], ref[name].T), name
    b, a = lora_factors(config, theta)["transformer.h.0.attn.c_attn"]
    assert np.array_equal(got["blk.0.attn_qkv.weight.lora_a"], a)  # 4 x 32
    assert np.array_equal(got["blk.0.attn_qkv.weight.lora_b"], b)  # 96 x 4


def _projection_adapter(path: Path, modules: list[ModuleSpec], projection: str) -> np.ndarray:
    """An adapter with the given projection; returns theta_D rebuilt independently."""
    d = 96
    theta = np.random.default_rng(3).uniform(-0.5, 0.5, d).astype(np.float32)
    total = ur.total_size({m.name: (m.out_features + m.in_features, 4) for m in modules})
    if projection == "explicit":
        rng = np.random.default_rng(4)
        pm = ProjectionMap.of(
            "explicit", rng.integers(0, d, total), rng.uniform(0.5, 1.5, total).astype(np.float32)
        )
        config = AdapterConfig(
            seed=5, vector_length=d, rank=4, alpha=4.0, modules=modules,
            projection="explicit", map_sha256=pm.sha256,
        )  # fmt: skip
        save_adapter(path, config, theta, projection_map=pm)
        return theta[pm.indices] * pm.scales
    config = AdapterConfig(
        seed=5, vector_length=d, rank=4, alpha=4.0, modules=modules, projection=projection
    )
    save_adapter(path, config, theta)
    (flat,) = ur.reconstruct(theta, 5, [(total, 1)], projection=projection)
    return flat.ravel()


@pytest.mark.parametrize("projection", ["sparse", "fastfood", "explicit"])
def test_every_projection(tmp_path: Path, projection: str) -> None:
    model = tiny_base("qwen2")
    model.save_pretrained(tmp_path / "base")
    modules = adapted_modules(model)
    flat = _projection_adapter(tmp_path / "ad", modules, projection)
    ur.export_gguf(tmp_path / "ad", tmp_path / "o.gguf", base=tmp_path / "base")
    got = {name: data for name, _, _, data in tensors(tmp_path / "o.gguf")}
    offset = 0
    for m, name in zip(modules, list(got)[::2], strict=True):
        nb, na = m.out_features * 4, 4 * m.in_features
        b = flat[offset : offset + nb].reshape(m.out_features, 4)
        a = flat[offset + nb : offset + nb + na].reshape(4, m.in_features)
        offset += nb + na
        assert np.array_equal(got[name], a) and np.array_equal(got[name[:-1] + "b"], b), name


def test_saved_modules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_base("llama")
    model.save_pretrained(tmp_path / "base")
    head = np.random.default_rng(1).standard_normal((64, 32)).astype(np.float32)
    write_adapter(tmp_path / "ad", adapted_modules(model), d=500, extra={"lm_head.weight": head})
    out = tmp_path / "o.gguf"
    args = ["export-gguf", str(tmp_path / "ad"), str(out), "--base", str(tmp_path / "base")]
    capsys.readouterr()
    assert main([*args, "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "modules_to_save (lm_head)" in err
    assert "vLLM" in err and "convert_lora_to_gguf.py" in err and "drop" in err
    assert not out.exists()

    assert main([*args, "--saved-modules", "drop", "--no-progress"]) == 0
    names = [t[0] for t in tensors(out)]
    assert len(names) == 28 and not any(n.startswith("output.") for n in names)
    assert not (tmp_path / "o.saved_modules.safetensors").exists()

    assert main([*args, "--saved-modules", "separate", "--overwrite", "--no-progress"]) == 0
    from safetensors.numpy import load_file

    saved = load_file(str(tmp_path / "o.saved_modules.safetensors"))
    assert list(saved) == ["lm_head.weight"] and np.array_equal(saved["lm_head.weight"], head)
    assert [t[0] for t in tensors(out)] == names


def test_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_base("llama")
    model.save_pretrained(tmp_path / "base")
    write_adapter(tmp_path / "ad", adapted_modules(model), d=500)
    ad, base = tmp_path / "ad", tmp_path / "base"

    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
    with pytest.raises(ur.InvalidArgumentError, match=r"'BertForMaskedLM'.*supported: Llama"):
        ur.export_gguf(ad, tmp_path / "o.gguf", base=bert)

    write_adapter(tmp_path / "odd", [ModuleSpec("model.layers.0.self_attn.rotary", 32, 32)], d=64)
    with pytest.raises(
        ur.InvalidArgumentError, match=r"'model\.layers\.0\.self_attn\.rotary'.*attn_q"
    ):
        ur.export_gguf(tmp_path / "odd", tmp_path / "o.gguf", base=base)

    with pytest.raises(ur.InvalidArgumentError, match="base model's folder"):
        ur.export_gguf(ad, tmp_path / "o.gguf")  # the adapter names no local base
    with pytest.raises(ur.InvalidArgumentError, match="inside the adapter folder"):
        ur.export_gguf(ad, ad / "o.gguf", base=base)
    with pytest.raises(ur.InvalidArgumentError, match="f32, f16, bf16, q8_0, got"):
        ur.export_gguf(ad, tmp_path / "o.gguf", base=base, outtype="q4_0")
    assert not (tmp_path / "o.gguf").exists()

    out = tmp_path / "o.gguf"
    ur.export_gguf(ad, out, base=base)
    before = out.read_bytes()
    with pytest.raises(FileExistsError):
        ur.export_gguf(ad, out, base=base)
    assert out.read_bytes() == before
    assert main(["export-gguf", str(ad), str(out), "--base", str(bert)]) == 1
    assert "supported: LlamaForCausalLM" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_no_torch_import(tmp_path: Path) -> None:
    import subprocess

    model = tiny_base("gemma")
    model.save_pretrained(tmp_path / "base")
    write_adapter(tmp_path / "ad", adapted_modules(model), d=500)
    code = (
        "import sys, unilora_rs as ur\n"
        f"ur.export_gguf({str(tmp_path / 'ad')!r}, {str(tmp_path / 'o.gguf')!r}, "
        f"base={str(tmp_path / 'base')!r})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert (tmp_path / "o.gguf").stat().st_size > 0


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"num_attention_heads": 3}, ur.MismatchError, r"3 heads of two rotary halves"),
        ({"num_attention_heads": 0}, ur.FormatError, r"num_attention_heads .* got 0"),
        ({"num_attention_heads": "4"}, ur.FormatError, r"num_attention_heads .* got '4'"),
        ({"num_key_value_heads": 0}, ur.FormatError, r"num_key_value_heads .* got 0"),
        ({"hidden_size": 64}, ur.MismatchError, r"maps 32 -> 32 features .* hidden size 64"),
        ({"num_hidden_layers": 1}, ur.MismatchError, r"is in layer 1, and .* has 1 layers"),
        ({"num_hidden_layers": True}, ur.FormatError, r"num_hidden_layers .* got True"),
    ],
)
def test_base_configs_that_do_not_fit_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict, error: type, match: str
) -> None:
    """Head counts 3 / 0 / "4" raised ValueError, ZeroDivisionError, TypeError; another
    hidden size was written without a check; fewer layers said "no llama.cpp LoRA
    tensor"."""
    model = tiny_base("llama")
    model.save_pretrained(tmp_path / "base")
    write_adapter(tmp_path / "ad", adapted_modules(model), d=500)
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    (tmp_path / "base" / "config.json").write_text(json.dumps({**config, **change}))
    out = tmp_path / "o.gguf"
    with pytest.raises(error, match=match):
        ur.export_gguf(tmp_path / "ad", out, base=tmp_path / "base")
    capsys.readouterr()
    assert (
        main(["export-gguf", str(tmp_path / "ad"), str(out), "--base", str(tmp_path / "base")]) == 1
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("saved", [False, True], ids=["gguf", "saved-modules"])
def test_a_full_disk_leaves_nothing_and_says_so(tmp_path: Path, saved: bool) -> None:
    """The gguf package writes tensors with numpy's tofile, which lost the failed write:
    success was printed over a truncated file; the saved-modules file raised an internal
    SafetensorError."""
    model = tiny_base("llama")
    model.save_pretrained(tmp_path / "base")
    extra = {"lm_head.weight": np.ones((64, 32), np.float32)} if saved else None
    write_adapter(tmp_path / "ad", adapted_modules(model), d=500, extra=extra)
    out = tmp_path / "o.gguf"
    argv = ["export-gguf", str(tmp_path / "ad"), str(out), "--base", str(tmp_path / "base")]
    if saved:
        argv += ["--saved-modules", "separate"]
    proc = cli_with_file_size_limit(4096, *argv, "--no-progress")
    assert proc.returncode == 1, proc.stdout
    assert proc.stderr.count("\n") == 1 and "internal error" not in proc.stderr, proc.stderr
    assert "File too large" in proc.stderr or "not written completely" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "base"]
    proc = cli_with_file_size_limit(1 << 30, *argv, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert len(gguf.GGUFReader(out).tensors) == 28
