"""Several adapters in one model: PEFT's names and layout, per-adapter modules_to_save,
mixed-adapter batches, and the theta_D cache of generate()."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import unilora_rs as ur  # noqa: E402
from tiny_models import VOCAB, tiny_llama, tiny_roberta  # noqa: E402
from unilora_rs.errors import InvalidArgumentError  # noqa: E402
from unilora_rs.torch import (  # noqa: E402
    UniLoRAConfig,
    UniLoRALayer,
    UniLoRAModel,
    get_unilora_model,
)
from unilora_rs.torch.layers import ModulesToSaveWrapper  # noqa: E402


def ids(batch: int = 2, seq: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


#: Adapters that differ in seed, d, rank, targets and projection.
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {"rank": 4, "vector_length": 512, "target_modules": ["q_proj", "v_proj"]},
    "b": {"rank": 2, "vector_length": 300, "seed": 7, "target_modules": "all-linear"},
    "c": {
        "rank": 3,
        "vector_length": 128,
        "seed": 9,
        "target_modules": ["o_proj", "down_proj"],
        "projection": "fastfood",
    },
}


def cfg(name: str, **kw: Any) -> UniLoRAConfig:
    return UniLoRAConfig(**{**CONFIGS[name], "init_range": 0.2, **kw})


def multi_llama() -> UniLoRAModel:
    model = get_unilora_model(tiny_llama(), cfg("default"))
    model.add_adapter("b", cfg("b"))
    model.add_adapter("c", cfg("c"))
    return model


def alone(name: str, theta: torch.Tensor) -> UniLoRAModel:
    """The same adapter as the only one of a fresh model, with the same vector."""
    single = get_unilora_model(tiny_llama(), cfg(name)).eval()
    with torch.no_grad():
        single.theta_d.copy_(theta)
    return single


def files(root: Path) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, f), root)
        for d, _, fs in os.walk(root)
        for f in fs
        if f != "README.md"
    )


def trainable(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ------------------------------------------------------------------ PEFT's names


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_add_set_delete_follow_peft(tmp_path: Path) -> None:
    """The same calls on PEFT's Uni-LoRA and on ours: active adapter, what trains, the
    folder layout of save_pretrained, the choice after deleting the active adapter."""
    pcfg = {"r": 4, "theta_d_length": 256, "target_modules": ["q_proj", "v_proj"]}
    theirs = peft.get_peft_model(tiny_llama(), peft.UniLoraConfig(**pcfg))
    ours = get_unilora_model(tiny_llama(), cfg("default"))
    for seed, name in ((3, "b"), (4, "c")):
        theirs.add_adapter(name, peft.UniLoraConfig(**pcfg, proj_seed=seed))
        ours.add_adapter(name, cfg(name))
    assert ours.active_adapter == theirs.active_adapter == "default"
    assert ours.active_adapters == theirs.active_adapters == ["default"]
    assert trainable(ours) == ["theta_d"]
    ours.set_adapter("b")
    theirs.set_adapter("b")
    assert ours.active_adapter == theirs.active_adapter == "b"
    assert trainable(ours) == ["theta_d_adapters.b"]
    assert all(n.endswith("unilora_theta_d.b") for n in trainable(theirs))
    assert ours.theta_d is ours.get_theta_d("b")
    for selected in (None, ["b"]):
        mine, peft_dir = tmp_path / f"ours-{selected}", tmp_path / f"peft-{selected}"
        ours.save_pretrained(mine, selected_adapters=selected)
        theirs.save_pretrained(peft_dir, selected_adapters=selected)
        assert files(mine) == files(peft_dir)
    with pytest.raises(InvalidArgumentError, match="already exists"):
        ours.add_adapter("c", cfg("c"))
    with pytest.raises(InvalidArgumentError, match="no adapter named 'zzz'"):
        ours.set_adapter("zzz")
    with pytest.warns(UserWarning):
        theirs.delete_adapter("b")
    ours.delete_adapter("b")
    assert ours.active_adapter == theirs.active_adapter == "c"
    assert list(ours.unilora_configs) == list(theirs.peft_config) == ["default", "c"]
    assert "theta_d_adapters.b" not in dict(ours.named_parameters())
    for name in ("default", "c"):
        ours.delete_adapter(name)
        theirs.delete_adapter(name)
    assert ours.active_adapters == theirs.active_adapters == []
    # No adapter left: the model is the base model again.
    assert not any(isinstance(m, UniLoRALayer) for m in ours.modules())
    x = ids()
    with torch.no_grad():
        assert torch.equal(ours(x).logits, tiny_llama()(x).logits)


def test_each_adapter_equals_its_single_adapter_model() -> None:
    model = multi_llama().eval()
    x = ids()
    outputs = {}
    for name in ("default", "b", "c"):
        model.set_adapter(name)
        with torch.no_grad():
            outputs[name] = model(x).logits
            single = alone(name, model.theta_d.detach())
            assert torch.equal(outputs[name], single(x).logits)
            assert single.adapter_config.fingerprint == model.adapter_config.fingerprint
    assert not torch.equal(outputs["b"], outputs["c"])
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(x).logits, tiny_llama()(x).logits)


def test_training_one_adapter_leaves_the_others() -> None:
    model = multi_llama()
    model.set_adapter("c")
    before = {n: model.get_theta_d(n).detach().clone() for n in ("default", "b", "c")}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = ids(4, 12)
    losses = []
    for _ in range(4):
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.equal(model.get_theta_d("c"), before["c"])
    for name in ("default", "b"):
        assert torch.equal(model.get_theta_d(name), before[name])


def test_save_and_load_several_adapters(tmp_path: Path) -> None:
    model = multi_llama().eval()
    model.save_pretrained(tmp_path)
    assert files(tmp_path) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "b/adapter_config.json",
        "b/adapter_model.safetensors",
        "c/adapter_config.json",
        "c/adapter_model.safetensors",
    ]
    # Each folder is an ordinary single adapter (the Rust tools read it).
    assert ur.load_adapter_config(tmp_path / "b").seed == 7
    loaded = UniLoRAModel.from_pretrained(tiny_llama(), tmp_path)
    loaded.load_adapter(tmp_path, adapter_name="b", subfolder="b")
    loaded.load_adapter(tmp_path / "c", adapter_name="c")
    assert loaded.active_adapter == "default"
    assert trainable(loaded) == []
    x = ids()
    for name in ("default", "b", "c"):
        model.set_adapter(name)
        loaded.set_adapter(name)
        with torch.no_grad():
            assert torch.equal(loaded(x).logits, model(x).logits)
    again = UniLoRAModel.from_pretrained(tiny_llama(), tmp_path / "c", adapter_name="c")
    assert again.active_adapter == "c"
    with torch.no_grad():
        assert torch.equal(again(x).logits, model(x).logits)


def test_bad_adapter_names_are_refused() -> None:
    model = get_unilora_model(tiny_llama(), cfg("default"))
    for bad in ("__base__", "a.b", "", "_x"):
        with pytest.raises(InvalidArgumentError):
            model.add_adapter(bad, cfg("b"))
    assert list(model.unilora_configs) == ["default"]


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ("a\nb", "control character '\\n'"),
        ("a\tb", "control character '\\t'"),
        ("x\x7f", "control character"),
        ("x" * 256, "256 bytes"),
        ("é" * 128, "256 bytes"),
    ],
)
def test_adapter_names_save_could_not_write_are_refused_when_added(
    tmp_path: Path, bad: str, match: str
) -> None:
    """A name with a line break or over the file-name limit was accepted and failed (or
    made a folder named with a line break) at save."""
    model = get_unilora_model(tiny_llama(), cfg("default"))
    with pytest.raises(InvalidArgumentError, match=re.escape(match)) as info:
        model.add_adapter(bad, cfg("b"))
    assert "\n" not in str(info.value) and len(str(info.value)) < 300
    assert list(model.unilora_configs) == ["default"]
    longest = "é" * 127 + "x"  # 255 bytes: the longest name a folder can have
    model.add_adapter(longest, cfg("b"))
    model.save_pretrained(tmp_path)
    assert ur.load_adapter_config(tmp_path / longest).seed == 7


def test_save_pretrained_without_adapters_is_an_error(tmp_path: Path) -> None:
    """Once every adapter was deleted save_pretrained returned without writing."""
    model = multi_llama()
    with pytest.raises(InvalidArgumentError, match="selected_adapters is empty"):
        model.save_pretrained(tmp_path, selected_adapters=[])
    for name in ("default", "b", "c"):
        model.delete_adapter(name)
    with pytest.raises(InvalidArgumentError, match="no adapter to save") as info:
        model.save_pretrained(tmp_path / "out")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ modules_to_save


def roberta_cfg(seed: int, **kw: Any) -> UniLoRAConfig:
    return UniLoRAConfig(
        rank=2, vector_length=200, seed=seed, modules_to_save=["classifier"], init_range=0.2, **kw
    )


def test_modules_to_save_are_copied_per_adapter(tmp_path: Path) -> None:
    base = tiny_roberta()
    model = get_unilora_model(base, roberta_cfg(0))
    model.add_adapter("other", roberta_cfg(5))
    wrapper = model.base_model.classifier
    assert isinstance(wrapper, ModulesToSaveWrapper)
    assert sorted(wrapper.modules_to_save.keys()) == ["default", "other"]
    x = ids()
    labels = torch.tensor([0, 2])
    for name in ("default", "other"):
        model.set_adapter(name)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
        for _ in range(2):
            model(x, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad()
    model.eval()
    plain = tiny_roberta().eval()
    heads = {n: wrapper.modules_to_save[n].out_proj.weight for n in ("default", "other")}
    assert not torch.equal(heads["default"], heads["other"])
    assert torch.equal(wrapper.original_module.out_proj.weight, plain.classifier.out_proj.weight)
    with torch.no_grad():
        with model.disable_adapter():  # the base head, not a trained one
            assert torch.equal(model(x).logits, plain(x).logits)
        expected = {}
        for name in ("default", "other"):
            model.set_adapter(name)
            expected[name] = model(x).logits
    # The single-adapter file format is unchanged: the head under its base names.
    model.save_pretrained(tmp_path)
    _, _, extra = ur.load_adapter(tmp_path)
    assert sorted(extra) == [
        "classifier.dense.bias",
        "classifier.dense.weight",
        "classifier.out_proj.bias",
        "classifier.out_proj.weight",
    ]
    loaded = UniLoRAModel.from_pretrained(tiny_roberta(), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, expected["default"])
        loaded.set_adapter("other")
        assert torch.equal(loaded(x).logits, expected["other"])
        # merge_and_unload keeps the active adapter's head (PEFT's rule).
        merged = loaded.merge_and_unload()
    assert not any(isinstance(m, ModulesToSaveWrapper) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, expected["other"], rtol=0, atol=1e-5)


def test_saved_module_cannot_be_adapted_by_another_adapter() -> None:
    model = get_unilora_model(tiny_roberta(), roberta_cfg(0))
    with pytest.raises(InvalidArgumentError, match="saves in full"):
        model.add_adapter("x", UniLoRAConfig(rank=2, vector_length=100, target_modules=["dense"]))
    assert list(model.unilora_configs) == ["default"]


# ------------------------------------------------------------------ mixed batches


def per_row(model: UniLoRAModel, x: torch.Tensor, names: list[str], **kw: Any) -> torch.Tensor:
    rows = []
    for i, name in enumerate(names):
        with torch.no_grad():
            if name == "__base__":
                with model.disable_adapter():
                    rows.append(model(x[i : i + 1], **kw).logits)
            else:
                model.set_adapter(name)
                rows.append(model(x[i : i + 1], **kw).logits)
    return torch.cat(rows)


def test_mixed_batch_equals_per_row_runs() -> None:
    model = multi_llama().eval()
    names = ["b", "__base__", "default", "c", "b", "c"]
    x = ids(len(names), 9, seed=4)
    with torch.no_grad():
        mixed = model(x, adapter_names=names).logits
    expected = per_row(model, x, names)
    torch.testing.assert_close(mixed, expected, rtol=0, atol=1e-5)
    assert model.active_adapter == "c"  # a mixed batch does not change the active adapter


def test_mixed_batch_with_heads_equals_per_row_runs() -> None:
    model = get_unilora_model(tiny_roberta(), roberta_cfg(0))
    model.add_adapter("other", roberta_cfg(5))
    with torch.no_grad():
        for p in model.base_model.classifier.modules_to_save["other"].parameters():
            p.mul_(-1.5)
    model.eval()
    names = ["other", "default", "__base__", "other"]
    x = ids(len(names), 8, seed=2)
    with torch.no_grad():
        mixed = model(x, adapter_names=names).logits
    torch.testing.assert_close(mixed, per_row(model, x, names), rtol=0, atol=1e-5)


def test_mixed_batch_errors() -> None:
    model = multi_llama()
    x = ids(2)
    with pytest.raises(InvalidArgumentError, match="for inference"):
        model(x, adapter_names=["b", "c"])
    model.eval()
    with pytest.raises(InvalidArgumentError, match="no adapter named 'nope'"):
        model(x, adapter_names=["b", "nope"])
    with pytest.raises(InvalidArgumentError, match="one adapter name per input row"):
        model(ids(3), adapter_names=["b", "c"])
    model.merge_adapter()
    with pytest.raises(InvalidArgumentError, match="merged"):
        model(x, adapter_names=["b", "c"])


def test_mixed_generate_equals_per_row_generate() -> None:
    model = multi_llama().eval()
    names = ["c", "b", "__base__"]
    x = ids(len(names), 5, seed=8)
    kw: dict[str, Any] = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        mixed = model.generate(input_ids=x, adapter_names=names, **kw)
        rows = []
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    rows.append(model.generate(input_ids=x[i : i + 1], **kw))
            else:
                model.set_adapter(name)
                rows.append(model.generate(input_ids=x[i : i + 1], **kw))
    assert torch.equal(mixed, torch.cat(rows))
    # Beam search repeats each row num_beams times; the names follow.
    with torch.no_grad():
        beams = model.generate(input_ids=x, adapter_names=names, num_beams=2, **kw)
    assert beams.shape[0] == len(names)


# ------------------------------------------------------------------ generate() cache


def test_generate_does_not_rebuild_per_token() -> None:
    model = multi_llama().eval()
    model.set_adapter("b")
    state = model._adapters["b"].state
    x = ids(2, 5)
    kw: dict[str, Any] = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        model.inference_cache = False
        state.rebuilds = 0
        uncached = model.generate(input_ids=x, **kw)
        assert state.rebuilds == 8  # one per decoding step
        model.inference_cache = True
        state.rebuilds = 0
        cached = model.generate(input_ids=x, **kw)
        assert state.rebuilds <= 1
        again = model.generate(input_ids=x, **kw)
        assert state.rebuilds <= 1
    assert torch.equal(cached, uncached) and torch.equal(again, uncached)
    # A changed theta_d (its version counter) is seen; so is another adapter.
    with torch.no_grad():
        before = model(x).logits
        model.theta_d.mul_(3.0)
        after = model(x).logits
        model.set_adapter("c")
        other = model(x).logits
    assert not torch.equal(before, after)
    model.inference_cache = False
    with torch.no_grad():
        model.set_adapter("b")
        torch.testing.assert_close(model(x).logits, after, rtol=0, atol=0)
        model.set_adapter("c")
        torch.testing.assert_close(model(x).logits, other, rtol=0, atol=0)


def test_cache_is_not_used_with_gradients() -> None:
    model = multi_llama()
    state = model._adapters["default"].state
    x = ids()
    state.rebuilds = 0
    for _ in range(2):
        model(x, labels=x).loss.backward()
    assert state.rebuilds == 2
    assert model.theta_d.grad is not None


def test_state_keys_and_saving_from_a_state_dict(tmp_path: Path) -> None:
    """save_pretrained(state_dict=...) (Trainer, FSDP2) finds every adapter's tensors
    under the keys state_key names."""
    model = get_unilora_model(tiny_roberta(), roberta_cfg(0))
    model.add_adapter("other", roberta_cfg(5))
    assert model.state_key("default", "theta_d") == "theta_d"
    assert model.state_key("other", "theta_d") == "theta_d_adapters.other"
    key = model.state_key("other", "classifier.dense.weight")
    assert key == "base_model.classifier.modules_to_save.other.dense.weight"
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "live")
    model.save_pretrained(tmp_path / "from-sd", state_dict=sd)
    assert model.save_pretrained(tmp_path / "not-main", is_main_process=False) is None
    assert not (tmp_path / "not-main").exists()
    for sub in ("", "other"):
        live = ur.load_adapter(tmp_path / "live" / sub)
        again = ur.load_adapter(tmp_path / "from-sd" / sub)
        assert live[0] == again[0] and np.array_equal(live[1], again[1])
        assert live[2].keys() == again[2].keys()
        assert all(np.array_equal(live[2][k], again[2][k]) for k in live[2])
