"""Uni-LoRA on quantized bases (QLoRA-style), on the CPU: bitsandbytes 8-bit
(``Linear8bitLt``) and 4-bit NF4 (``Linear4bit``) loaded through transformers. The loss
falls with gradients to theta_d only, and merge_and_unload dequantises, merges and
gives a float model close to the float32 reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")

from tiny_models import VOCAB, tiny_llama  # noqa: E402
from unilora_rs.errors import InvalidArgumentError  # noqa: E402
from unilora_rs.torch import UniLoRAConfig, get_unilora_model  # noqa: E402
from unilora_rs.torch.quant import dequantized_weight, quantization_kind  # noqa: E402

QUANT: dict[str, dict[str, Any]] = {
    "8bit": {"load_in_8bit": True},
    "4bit": {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": torch.float32,
    },
}
KIND = {"8bit": "bnb-8bit", "4bit": "bnb-4bit"}


def ids(batch: int = 4, seq: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fp32-base")
    tiny_llama(hidden=64).save_pretrained(folder)
    return folder


def load(folder: Path, bits: str) -> torch.nn.Module:
    cfg = transformers.BitsAndBytesConfig(**QUANT[bits])
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), quantization_config=cfg, device_map="cpu"
    )


def cfg() -> UniLoRAConfig:
    return UniLoRAConfig(rank=4, vector_length=1024, target_modules="all-linear", init_range=0.05)


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantized_base_trains_and_merges(base_dir: Path, bits: str, tmp_path: Path) -> None:
    base = load(base_dir, bits)
    q_proj = base.model.layers[0].self_attn.q_proj
    assert quantization_kind(q_proj) == KIND[bits]
    model = get_unilora_model(base, cfg())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["theta_d"]
    assert model.adapter_config.modules[0].in_features == 64  # not the packed shape
    x = ids()
    opt = torch.optim.AdamW([model.theta_d], lr=2e-2)
    losses = []
    for _ in range(8):
        loss = model(x, labels=x).loss
        loss.backward()
        assert [n for n, p in model.named_parameters() if p.grad is not None] == ["theta_d"]
        assert model.theta_d.grad.dtype == torch.float32
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    model.eval()
    with pytest.raises(InvalidArgumentError, match="merge_and_unload"):
        model.merge_adapter()
    with torch.no_grad():
        adapted = model(x).logits
    theta = model.theta_d.detach().clone()
    layer = model.base_model.model.layers[0].self_attn.q_proj
    expected_w = dequantized_weight(layer.base_layer) + layer.delta_weight(
        model._rebuild().detach(), "default"
    )
    merged = model.merge_and_unload(dtype=torch.float32)
    assert not any(quantization_kind(m) for m in merged.modules())
    assert not hasattr(merged.config, "quantization_config")
    assert torch.equal(merged.model.layers[0].self_attn.q_proj.weight, expected_w)
    with torch.no_grad():
        out = merged(x).logits
    # The merged float model computes what the adapted quantized model computed (the
    # 8-bit matmul quantises activations, the 4-bit CPU kernel runs in bfloat16, so it is
    # close, not equal).
    own = (out - adapted).abs().max().item()
    assert own < {"8bit": 0.05, "4bit": 0.01}[bits], own
    # Against the float32 reference (the same theta_d on the unquantized base): the
    # difference is the quantization error of the base weights.
    reference = get_unilora_model(tiny_llama(hidden=64), cfg()).eval()
    with torch.no_grad():
        reference.theta_d.copy_(theta)
        ref = reference.merge_and_unload()(x).logits
    err = (out - ref).abs().max().item()
    print(f"{bits}: loss {losses[0]:.4f} -> {losses[-1]:.4f}; ", end="")
    print(f"merged vs adapted {own:.2e}, vs fp32 {err:.2e}")
    assert err < {"8bit": 0.05, "4bit": 0.5}[bits], err
    # The merged model saves as a plain float checkpoint and loads back.
    merged.save_pretrained(tmp_path / "merged")
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    with torch.no_grad():
        assert torch.equal(again(x).logits, out)


# ------------------------------------------------------------------ the Rust merge


@pytest.mark.parametrize(
    "bits",
    [
        "8bit",
        "4bit",
        pytest.param("4bit-plain", id="4bit-fp4-not-nested"),
    ],
)
def test_rust_merge_of_a_quantized_checkpoint(base_dir: Path, bits: str, tmp_path: Path) -> None:
    """A checkpoint saved from a bitsandbytes model merges without torch: every weight
    dequantised as bitsandbytes does it, the update added, float32 written, the
    quantization config gone; equal to merge_and_unload of the same quantized model."""
    import unilora_rs as ur
    from unilora_rs.torch import UniLoRAModel

    quant = dict(QUANT["4bit" if bits.startswith("4bit") else bits])
    if bits == "4bit-plain":
        quant.update(bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False)
    qcfg = transformers.BitsAndBytesConfig(**quant)
    saved = tmp_path / "quantized"
    transformers.AutoModelForCausalLM.from_pretrained(
        str(base_dir), quantization_config=qcfg, device_map="cpu"
    ).save_pretrained(saved)
    model = get_unilora_model(tiny_llama(hidden=64), cfg())
    with torch.no_grad():
        model.theta_d.uniform_(-0.3, 0.3)
    model.save_pretrained(tmp_path / "adapter")
    result = ur.merge(saved, tmp_path / "adapter", tmp_path / "merged")
    assert result.dequantized == 14 and result.merged_count == 14
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert not hasattr(merged.config, "quantization_config")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(saved), device_map="cpu")
    ours = UniLoRAModel.from_pretrained(loaded, tmp_path / "adapter").merge_and_unload(
        dtype=torch.float32
    )
    worst = 0.0
    for name, p in ours.named_parameters():
        q = merged.get_parameter(name)
        worst = max(worst, (p - q).abs().max().item())
    assert worst < 1e-6, worst
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, ours(x).logits, rtol=0, atol=1e-5)
