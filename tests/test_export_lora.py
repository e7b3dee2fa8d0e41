"""Exact LoRA export: PEFT loads it and computes what the Uni-LoRA model computes; the
merged checkpoint loads in transformers and computes the same."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import unilora_rs as ur
from merge_helpers import lora_factors, write_adapter
from safetensors.torch import load_file
from unilora_rs.adapter import ModuleSpec

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ATOL = 1e-5


def tiny_llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def adapted_modules(model: torch.nn.Module) -> list[ModuleSpec]:
    from transformers.pytorch_utils import Conv1D

    specs = []
    for name, mod in model.named_modules():
        if name == "lm_head":
            continue
        if isinstance(mod, torch.nn.Linear):
            specs.append(ModuleSpec(name, mod.in_features, mod.out_features, "linear"))
        elif isinstance(mod, Conv1D):
            fan_in, fan_out = mod.weight.shape
            specs.append(ModuleSpec(name, fan_in, fan_out, "conv1d"))
    return specs


def patched_logits(base_dir: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    """The Uni-LoRA model's output, computed independently: the base model with every
    adapted weight replaced by W + (alpha / r) B @ A (transposed for Conv1D) in torch."""
    config = ur.load_adapter_config(adapter)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    factors = lora_factors(config, tensors.pop("theta_d").numpy())
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for spec in config.modules:
            b, a = (torch.from_numpy(x) for x in factors[spec.name])
            delta = config.scaling * (b @ a)
            params[f"{spec.name}.weight"] += delta.T if spec.kind == "conv1d" else delta
        for name, value in tensors.items():
            params[name].copy_(value)
        return model(ids).logits


def lora_layers(model: torch.nn.Module) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return [
        n.removeprefix("base_model.model.")
        for n, m in model.named_modules()
        if isinstance(m, LoraLayer)
    ]


# PEFT 0.21 reads a property that transformers 5 deprecates; not ours to fix.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_loads_export_and_matches(tmp_path: Path, arch: str) -> None:
    model = tiny_llama() if arch == "llama" else tiny_gpt2()
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    modules = adapted_modules(model)
    assert {m.kind for m in modules} == ({"linear"} if arch == "llama" else {"conv1d"})
    extra = None
    if arch == "llama":  # a modules_to_save head as well
        rng = np.random.default_rng(1)
        extra = {"lm_head.weight": rng.standard_normal((64, 32)).astype(np.float32) * 0.05}
    d = ur.total_size({m.name: (m.out_features + m.in_features, 4) for m in modules}) // 16
    write_adapter(tmp_path / "uni", modules, rank=4, alpha=6.0, d=d, extra=extra)
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(2))
    want = patched_logits(base_dir, tmp_path / "uni", ids)
    plain = model(ids).logits
    assert (want - plain).abs().max() > 1e-3  # the adapter does change the model

    keep = "keep" if extra else "error"  # PEFT loads saved modules
    result = ur.export_lora(tmp_path / "uni", tmp_path / "lora", saved_modules=keep)
    assert result.modules == len(modules)
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 6
    assert cfg["fan_in_fan_out"] is (arch == "gpt2")
    keys = set(load_file(str(tmp_path / "lora" / "adapter_model.safetensors")))
    assert f"base_model.model.{modules[0].name}.lora_A.weight" in keys
    assert f"base_model.model.{modules[0].name}.lora_B.weight" in keys

    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    lora = peft.PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    assert sorted(lora_layers(lora)) == sorted(m.name for m in modules)  # exactly those
    with torch.no_grad():
        got = lora(ids).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)

    # The merged checkpoint, loaded by transformers, computes the same.
    ur.merge(base_dir, tmp_path / "uni", tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, want, atol=ATOL, rtol=0)


def test_export_dtype_and_errors(tmp_path: Path) -> None:
    mods = [ModuleSpec("a.q", 16, 24), ModuleSpec("a.v", 16, 8)]
    config, theta = write_adapter(tmp_path / "uni", mods, d=64)
    ur.export_lora(tmp_path / "uni", tmp_path / "bf", dtype="bf16")
    sd = load_file(str(tmp_path / "bf" / "adapter_model.safetensors"))
    b, a = lora_factors(config, theta)["a.q"]
    assert sd["base_model.model.a.q.lora_A.weight"].dtype == torch.bfloat16
    assert torch.equal(
        sd["base_model.model.a.q.lora_A.weight"], torch.from_numpy(a).to(torch.bfloat16)
    )
    assert torch.equal(
        sd["base_model.model.a.q.lora_B.weight"], torch.from_numpy(b).to(torch.bfloat16)
    )
    with pytest.raises(FileExistsError):
        ur.export_lora(tmp_path / "uni", tmp_path / "bf")
    with pytest.raises(ur.InvalidArgumentError):
        ur.export_lora(tmp_path / "uni", tmp_path / "uni" / "lora")
    with pytest.raises(ur.DtypeError, match="bf16, f16, f32"):
        ur.export_lora(tmp_path / "uni", tmp_path / "x", dtype="q4")
    assert not (tmp_path / "x").exists()


def test_saved_modules_options(tmp_path: Path) -> None:
    """modules_to_save: refused by default (vLLM and llama.cpp's converter reject them),
    kept for PEFT, dropped, or written beside the LoRA factors under their own names."""
    mods = [ModuleSpec("a.q", 16, 24), ModuleSpec("a.v", 16, 8)]
    head = np.random.default_rng(5).standard_normal((6, 16)).astype(np.float32)
    bias = np.arange(6, dtype=np.float32)
    extra = {"head.weight": head, "head.bias": bias}
    config, theta = write_adapter(tmp_path / "uni", mods, d=64, extra=extra)
    b, a = lora_factors(config, theta)["a.v"]

    with pytest.raises(ur.InvalidArgumentError, match=r"modules_to_save \(head\).*vLLM.*drop"):
        ur.export_lora(tmp_path / "uni", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ur.InvalidArgumentError, match="error, keep, drop, separate"):
        ur.export_lora(tmp_path / "uni", tmp_path / "x", saved_modules="ignore")

    def read(name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        folder = tmp_path / name
        cfg = json.loads((folder / "adapter_config.json").read_text())
        return cfg, load_file(str(folder / "adapter_model.safetensors"))

    ur.export_lora(tmp_path / "uni", tmp_path / "keep", saved_modules="keep")
    cfg, sd = read("keep")
    assert cfg["modules_to_save"] == ["head"]
    assert torch.equal(sd["base_model.model.head.weight"], torch.from_numpy(head))

    for mode in ("drop", "separate"):
        result = ur.export_lora(tmp_path / "uni", tmp_path / mode, saved_modules=mode)
        cfg, sd = read(mode)
        assert cfg["modules_to_save"] is None
        assert sorted(sd) == sorted(
            f"base_model.model.{m}.lora_{x}.weight" for m in ("a.q", "a.v") for x in "AB"
        )
        assert np.array_equal(sd["base_model.model.a.v.lora_A.weight"].numpy(), a)
        assert np.array_equal(sd["base_model.model.a.v.lora_B.weight"].numpy(), b)
        companion = tmp_path / mode / "saved_modules.safetensors"
        if mode == "drop":
            assert result.saved_tensors == 0 and result.saved_file is None
            assert not companion.exists()
        else:
            assert result.saved_tensors == 2 and result.saved_file == companion
            saved = load_file(str(companion))
            assert sorted(saved) == ["head.bias", "head.weight"]
            assert torch.equal(saved["head.weight"], torch.from_numpy(head))
            assert torch.equal(saved["head.bias"], torch.from_numpy(bias))
