"""UniLoRAModel on tiny transformers models built from configs (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import unilora_rs as ur  # noqa: E402
from tiny_models import VOCAB, tiny_gpt2, tiny_llama, tiny_roberta  # noqa: E402
from torch import nn  # noqa: E402
from unilora_rs.adapter import CONFIG_NAME, WEIGHTS_NAME  # noqa: E402
from unilora_rs.errors import InvalidArgumentError, MismatchError  # noqa: E402
from unilora_rs.torch import (  # noqa: E402
    UniLoRAConfig,
    UniLoRALayer,
    UniLoRAModel,
    get_unilora_model,
)


def ids(batch: int = 2, seq: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def llama_cfg(**kw: Any) -> UniLoRAConfig:
    base: dict[str, Any] = {"rank": 4, "vector_length": 512, "target_modules": "all-linear"}
    base.update(kw)
    return UniLoRAConfig(**base)


def train(model: nn.Module, batch: torch.Tensor, steps: int, lr: float = 1e-2) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


# ------------------------------------------------------------------ trainable parameters


def test_only_theta_d_is_trainable(capsys: pytest.CaptureFixture[str]) -> None:
    model = get_unilora_model(tiny_llama(), llama_cfg())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["theta_d"]
    assert model.theta_d.dtype == torch.float32
    model(ids(), labels=ids()).loss.backward()
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    assert with_grad == ["theta_d"]
    assert model.theta_d.grad.abs().sum() > 0
    model.print_trainable_parameters()
    out = capsys.readouterr().out
    total = sum(p.numel() for p in model.parameters())
    assert f"trainable params: 512 || all params: {total:,d}" in out


def test_modules_to_save_are_trainable_and_saved(tmp_path: Path) -> None:
    base = tiny_roberta()
    model = get_unilora_model(
        base, UniLoRAConfig(rank=2, vector_length=200, modules_to_save=["classifier"])
    )
    names = [s.name for s in model.adapter_config.modules]
    assert names == [
        f"roberta.encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value")
    ]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # The head is trained in the adapter's copy (PEFT's ModulesToSaveWrapper names); the
    # base model's own head stays frozen for disable_adapter().
    copy = "base_model.classifier.modules_to_save.default"
    assert trainable == {
        "theta_d",
        f"{copy}.dense.weight",
        f"{copy}.dense.bias",
        f"{copy}.out_proj.weight",
        f"{copy}.out_proj.bias",
    }
    labels = torch.tensor([0, 2])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(ids(), labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        expected = model(ids()).logits
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["modules_to_save"] == ["classifier"]
    _, _, extra = ur.load_adapter(tmp_path)
    assert sorted(extra) == [
        "classifier.dense.bias",
        "classifier.dense.weight",
        "classifier.out_proj.bias",
        "classifier.out_proj.weight",
    ]
    fresh = tiny_roberta()  # same base weights; the head is reset so it must come from the file
    with torch.no_grad():
        for p in fresh.classifier.parameters():
            p.zero_()
    loaded = UniLoRAModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids()).logits, expected)


# ------------------------------------------------------------------ training, merge, disable


def test_training_reduces_loss() -> None:
    model = get_unilora_model(tiny_llama(), llama_cfg(vector_length=1024))
    losses = train(model, ids(4, 12), steps=8, lr=2e-2)
    assert losses[-1] < losses[0] - 1e-3


def test_merge_unmerge_disable_and_unload() -> None:
    base = tiny_llama()
    x = ids()
    with torch.no_grad():
        reference = base(x).logits.clone()
    model = get_unilora_model(base, llama_cfg(alpha=8.0, init_range=0.2))
    model.eval()
    with torch.no_grad():
        adapted = model(x).logits
        assert (adapted - reference).abs().max() > 1e-3  # the adapter does something
        with model.disable_adapter():
            assert torch.equal(model(x).logits, reference)
        model.merge_adapter()
        torch.testing.assert_close(model(x).logits, adapted, rtol=0, atol=1e-5)
        with model.disable_adapter():
            torch.testing.assert_close(model(x).logits, reference, rtol=0, atol=1e-5)
        torch.testing.assert_close(model(x).logits, adapted, rtol=0, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(x).logits, adapted, rtol=0, atol=1e-5)
        plain = model.merge_and_unload()
    assert not any(isinstance(m, UniLoRALayer) for m in plain.modules())
    assert isinstance(plain.model.layers[0].self_attn.q_proj, nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, adapted, rtol=0, atol=1e-5)


def test_merge_matches_rust_reconstruct_conv1d() -> None:
    """GPT-2 Conv1D: delta W = (alpha/r) (B A)^T with A, B from the Rust reconstruct."""
    base = tiny_gpt2()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_unilora_model(base, UniLoRAConfig(rank=2, vector_length=300, alpha=4.0)).eval()
    assert [s.kind for s in model.adapter_config.modules] == ["conv1d", "conv1d"]
    mats = ur.reconstruct(
        model.theta_d.detach().numpy(),
        model.adapter_config.seed,
        model.adapter_config.matrix_shapes(),
    )
    ours = model.lora_matrices()
    for spec in model.adapter_config.modules:
        a, b = ours[spec.name]
        assert torch.equal(a, torch.from_numpy(mats[f"{spec.name}.lora_A"]))
        assert torch.equal(b, torch.from_numpy(mats[f"{spec.name}.lora_B"]))
    x = ids()
    with torch.no_grad():
        adapted = model(x).logits
    plain = model.merge_and_unload()
    for spec in model.adapter_config.modules:
        a = mats[f"{spec.name}.lora_A"].astype(np.float64)
        b = mats[f"{spec.name}.lora_B"].astype(np.float64)
        w0 = before[f"{spec.name}.weight"].numpy().astype(np.float64)
        expected = w0 + 2.0 * (b @ a).T
        got = plain.get_submodule(spec.name).weight.detach().numpy()
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, adapted, rtol=0, atol=1e-5)


def test_lora_branch_matches_explicit_formula() -> None:
    layer = nn.Linear(12, 7)
    holder = nn.Sequential(layer)
    model = get_unilora_model(
        holder, UniLoRAConfig(rank=3, vector_length=40, target_modules=["0"], alpha=6.0)
    )
    x = torch.randn(5, 12)
    (flat,) = ur.reconstruct(model.theta_d.detach().numpy(), 0, [(7 * 3 + 3 * 12, 1)])
    b = torch.from_numpy(flat[: 7 * 3].reshape(7, 3))
    a = torch.from_numpy(flat[7 * 3 :].reshape(3, 12))
    expected = (x @ layer.weight.detach().T + layer.bias.detach()) + 2.0 * (x @ a.T @ b.T)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_cached_and_on_the_fly_modes_agree() -> None:
    model = get_unilora_model(tiny_llama(), llama_cfg())
    x = ids()
    model(x, labels=x).loss.backward()
    g_fly = model.theta_d.grad.clone()
    model.theta_d.grad = None
    model.set_index_mode("cached")
    model(x, labels=x).loss.backward()
    torch.testing.assert_close(model.theta_d.grad, g_fly, rtol=1e-5, atol=1e-8)
    model.set_index_mode("on_the_fly", backend="torch")
    model.theta_d.grad = None
    model(x, labels=x).loss.backward()
    torch.testing.assert_close(model.theta_d.grad, g_fly, rtol=1e-5, atol=1e-8)


def test_bf16_base_trains_with_float32_vector() -> None:
    base = tiny_llama(dtype=torch.bfloat16)
    model = get_unilora_model(base, llama_cfg(vector_length=1024))
    assert model.theta_d.dtype == torch.float32
    assert model._rebuild().dtype == torch.float32  # scales and theta_D stay float32
    model.to(torch.bfloat16)  # casting the whole model keeps theta_d in float32
    assert model.theta_d.dtype == torch.float32
    x = ids(4, 12)
    losses = train(model, x, steps=8, lr=2e-2)
    assert model.theta_d.grad is None or model.theta_d.grad.dtype == torch.float32
    assert losses[-1] < losses[0]
    layer = next(model.unilora_layers())
    assert layer.base_layer.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert model(x).logits.dtype == torch.bfloat16


# ------------------------------------------------------------------ targeting rules


def _names(model: UniLoRAModel) -> list[str]:
    return [s.name for s in model.adapter_config.modules]


def test_target_rules() -> None:
    m = get_unilora_model(tiny_llama(), llama_cfg(vector_length=64, target_modules=["q_proj"]))
    assert _names(m) == [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    exact = "model.layers.1.mlp.down_proj"
    m = get_unilora_model(tiny_llama(), llama_cfg(vector_length=64, target_modules=[exact]))
    assert _names(m) == [exact]
    m = get_unilora_model(
        tiny_llama(), llama_cfg(vector_length=64, target_modules=r".*\.1\.self_attn\.[kv]_proj")
    )
    assert _names(m) == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"]
    m = get_unilora_model(tiny_llama(), llama_cfg(vector_length=64))
    assert len(_names(m)) == 14 and "lm_head" not in _names(m)
    m = get_unilora_model(
        tiny_llama(), llama_cfg(vector_length=64, exclude_modules=["mlp.gate_proj", "up_proj"])
    )
    assert len(_names(m)) == 10 and not any("gate" in n or "up_proj" in n for n in _names(m))
    m = get_unilora_model(tiny_llama(), UniLoRAConfig(rank=2, vector_length=64))
    assert _names(m) == [
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")
    ]


def test_bad_configs_are_refused() -> None:
    with pytest.raises(InvalidArgumentError, match=r"larger than D = 4096.*e\.g\. d = 256"):
        get_unilora_model(tiny_llama(), llama_cfg(vector_length=10**6))
    with pytest.raises(InvalidArgumentError, match=r"matches no nn\.Linear"):
        get_unilora_model(tiny_llama(), llama_cfg(target_modules=["nope"]))
    with pytest.raises(InvalidArgumentError, match=r"only nn\.Linear and GPT-2 Conv1D"):
        get_unilora_model(tiny_llama(), llama_cfg(target_modules=["embed_tokens"]))
    with pytest.raises(InvalidArgumentError, match="invalid regular expression"):
        UniLoRAConfig(target_modules="(")
    with pytest.raises(InvalidArgumentError, match="rank"):
        UniLoRAConfig(rank=0)
    with pytest.raises(InvalidArgumentError, match="index_mode"):
        UniLoRAConfig(index_mode="table")
    with pytest.raises(InvalidArgumentError, match="modules_to_save: no module"):
        get_unilora_model(tiny_llama(), llama_cfg(modules_to_save=["classifier"]))
    model = get_unilora_model(tiny_llama(), llama_cfg())
    with pytest.raises(InvalidArgumentError, match="already holds Uni-LoRA layers"):
        get_unilora_model(model.base_model, llama_cfg())


# ------------------------------------------------------------------ save / load


def _trained_llama() -> UniLoRAModel:
    model = get_unilora_model(tiny_llama(), llama_cfg(seed=1234, alpha=2.0))
    train(model, ids(), steps=2)
    return model.eval()


def test_save_load_roundtrip(tmp_path: Path) -> None:
    model = _trained_llama()
    x = ids(seed=7)
    with torch.no_grad():
        expected = model(x).logits
    model.save_pretrained(tmp_path)
    cfg = ur.load_adapter_config(tmp_path)
    assert (cfg.seed, cfg.vector_length, cfg.rank, cfg.alpha) == (1234, 512, 4, 2.0)
    assert cfg.modules == model.adapter_config.modules
    loaded = UniLoRAModel.from_pretrained(tiny_llama(), tmp_path)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(loaded.theta_d, model.theta_d.detach())
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, expected)
    trainable = UniLoRAModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert [n for n, p in trainable.named_parameters() if p.requires_grad] == ["theta_d"]


def test_changed_seed_or_modules_are_refused(tmp_path: Path) -> None:
    model = _trained_llama()
    model.save_pretrained(tmp_path)
    path = tmp_path / CONFIG_NAME
    original = json.loads(path.read_text())

    changed = dict(original, seed=original["seed"] + 1)
    path.write_text(json.dumps(changed))
    with pytest.raises(
        MismatchError, match=r"fingerprint mismatch.*seed, d or module list was changed"
    ):
        UniLoRAModel.from_pretrained(tiny_llama(), tmp_path)

    changed = dict(original, modules=original["modules"][:-1])
    path.write_text(json.dumps(changed))
    with pytest.raises(MismatchError, match="fingerprint mismatch"):
        UniLoRAModel.from_pretrained(tiny_llama(), tmp_path)

    path.write_text(json.dumps(original))
    with pytest.raises(MismatchError, match="was trained on in=32, out=32"):
        UniLoRAModel.from_pretrained(tiny_llama(hidden=64), tmp_path)
    with pytest.raises(MismatchError, match="does not exist in the base model"):
        UniLoRAModel.from_pretrained(tiny_gpt2(), tmp_path)
    with pytest.raises(FileNotFoundError):
        UniLoRAModel.from_pretrained(tiny_llama(), tmp_path / "missing")


def test_from_pretrained_hub_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    huggingface_hub = pytest.importorskip("huggingface_hub")
    model = _trained_llama()
    served = tmp_path / "served"
    model.save_pretrained(served)
    calls: list[tuple[str, str, str | None]] = []

    def fake_download(*, repo_id: str, filename: str, revision: str | None = None, **_: Any) -> str:
        calls.append((repo_id, filename, revision))
        return str(served / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    loaded = UniLoRAModel.from_pretrained(tiny_llama(), "someone/tiny-adapter", revision="v1")
    assert calls == [
        ("someone/tiny-adapter", CONFIG_NAME, "v1"),
        ("someone/tiny-adapter", WEIGHTS_NAME, "v1"),
    ]
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


# ------------------------------------------------------------------ training tools


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_same_gradient(reentrant: bool) -> None:
    model = get_unilora_model(tiny_llama(), llama_cfg())
    model.train()
    x = ids()
    model(x, labels=x).loss.backward()
    expected = model.theta_d.grad.clone()
    model.theta_d.grad = None
    model.activation_checkpointing_enable({"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()
    model(x, labels=x).loss.backward()
    torch.testing.assert_close(model.theta_d.grad, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("projection", ["sparse", "fastfood"])
def test_torch_compile_has_no_graph_break_in_the_adapter(projection: str) -> None:
    torch._dynamo.reset()
    model = get_unilora_model(tiny_llama(), llama_cfg(projection=projection))
    x = ids()
    model(x, labels=x).loss.backward()
    expected = model.theta_d.grad.clone()
    model.theta_d.grad = None
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(x, labels=x).loss.backward()
    torch.testing.assert_close(model.theta_d.grad, expected, rtol=1e-6, atol=1e-9)
    torch._dynamo.reset()


def test_layer_used_alone_rebuilds_after_update() -> None:
    model = get_unilora_model(tiny_llama(), llama_cfg())
    layer = next(model.unilora_layers())
    h = torch.randn(3, 32)
    first = layer(h)
    with torch.no_grad():
        model.theta_d.mul_(2.0)
    second = layer(h)
    base = layer.base_layer(h)
    # A and B both double, so the branch x A^T B^T is four times larger.
    torch.testing.assert_close(second - base, 4.0 * (first - base), rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------ next to PEFT


def test_from_pretrained_returns_an_eval_model_unless_trainable(tmp_path: Path) -> None:
    _trained_llama().save_pretrained(tmp_path)
    base = tiny_llama().train()  # built directly: training mode
    loaded = UniLoRAModel.from_pretrained(base, tmp_path, dropout=0.5)
    assert not any(m.training for m in loaded.modules())
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, loaded(x).logits)  # the branch dropout is off
    trainable = UniLoRAModel.from_pretrained(tiny_llama().train(), tmp_path, is_trainable=True)
    assert all(m.training for m in trainable.modules())


def test_default_targets_are_stored_resolved(tmp_path: Path) -> None:
    model = get_unilora_model(tiny_roberta(), UniLoRAConfig(rank=2, vector_length=200))
    assert model.adapter_config.target_modules == ["query", "value"]
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["target_modules"] == [
        "query",
        "value",
    ]
    loaded = UniLoRAModel.from_pretrained(tiny_roberta(), tmp_path)
    assert loaded.adapter_config.target_modules == ["query", "value"]


# PEFT 0.21 reads a property that transformers 5 deprecates; not ours to fix.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_peft_and_unilora_do_not_stack() -> None:
    peft = pytest.importorskip("peft")
    uni = get_unilora_model(tiny_llama(), llama_cfg(target_modules=["q_proj"]))
    with pytest.raises(InvalidArgumentError, match=r"cannot wrap a UniLoRAModel"):
        peft.get_peft_model(uni, peft.LoraConfig(r=2, target_modules=["k_proj"]))

    lora = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["k_proj"]))
    for model in (lora, lora.base_model.model):
        with pytest.raises(InvalidArgumentError, match=r"already holds PEFT"):
            get_unilora_model(model, llama_cfg(target_modules=["q_proj"]))
    assert not any(isinstance(m, UniLoRALayer) for m in lora.modules())  # left untouched


@pytest.mark.parametrize(
    "peft_name, ours",
    [
        ("r", "rank"),
        ("theta_d_length", "vector_length"),
        ("proj_seed", "seed"),
        ("init_theta_d_bound", "init_range"),
        ("unilora_dropout", "dropout"),
    ],
)
def test_peft_argument_names_point_to_ours(peft_name: str, ours: str) -> None:
    with pytest.raises(InvalidArgumentError, match=rf"{peft_name}.*PEFT.*use {ours}="):
        UniLoRAConfig(**{peft_name: 1})


def test_unknown_config_argument_lists_the_valid_ones() -> None:
    with pytest.raises(InvalidArgumentError, match=r"ranks.*valid arguments: rank, vector_length"):
        UniLoRAConfig(ranks=4)  # type: ignore[call-arg]
