"""Merging a task adapter into a base checkpoint: the trained head is added, config.json
names the task model, and transformers loads the merged folder as the trained model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import unilora_rs as ur  # noqa: E402
from unilora_rs.datasets import LabelMap  # noqa: E402
from unilora_rs.errors import FormatError, InvalidArgumentError, MismatchError  # noqa: E402
from unilora_rs.torch import UniLoRAConfig, get_unilora_model  # noqa: E402
from unilora_rs.torch.training import task_record  # noqa: E402

LABELS = LabelMap.from_keys(["neg", "neu", "pos"])


def _base(folder: Path, shard_size: str | None = None) -> Path:
    """A tiny BERT encoder saved as a base checkpoint (no head, names without prefix)."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
    )
    model = transformers.BertModel(cfg)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return folder


def _task_adapter(base: Path, out: Path, *, with_task: bool = True) -> torch.nn.Module:
    """A classification model on ``base`` with a Uni-LoRA adapter and a trained head."""
    with torch.no_grad():
        model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
            str(base),
            num_labels=3,
            id2label=LABELS.id2label,
            label2id=LABELS.label2id,
            output_loading_info=True,
        )
    new = sorted(info["missing_keys"])
    assert new == ["classifier.bias", "classifier.weight"]
    wrapped = get_unilora_model(
        model,
        UniLoRAConfig(
            rank=4,
            vector_length=300,
            target_modules="all-linear",
            exclude_modules=["classifier"],
            modules_to_save=["classifier"],
        ),
    )
    with torch.no_grad():  # stands for training: every trained tensor moves
        wrapped.theta_d.normal_(0, 0.5)
        model.classifier.weight.normal_(0, 1)
        model.classifier.bias.normal_(0, 1)
    if with_task:
        wrapped.adapter_config.task = task_record("classification", model, LABELS, new, False)
    wrapped.save_pretrained(out)
    return wrapped.eval()


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.mark.parametrize("shard_size", [None, "60KB"])
def test_merged_folder_is_the_trained_classifier(tmp_path: Path, shard_size: str | None) -> None:
    base = _base(tmp_path / "base", shard_size)
    sharded = (base / "model.safetensors.index.json").exists()
    assert sharded == (shard_size is not None)
    trained = _task_adapter(base, tmp_path / "adapter")
    result = ur.merge(base, tmp_path / "adapter", tmp_path / "merged")
    assert sorted(result.added) == ["classifier.bias", "classifier.weight"]
    assert sorted(result.config_keys) == ["architectures", "id2label", "label2id", "problem_type"]
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert cfg["architectures"] == ["BertForSequenceClassification"]
    assert cfg["id2label"] == {"0": "neg", "1": "neu", "2": "pos"}
    if sharded:
        index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
        last = sorted(set(index["weight_map"].values()))[-1]
        assert index["weight_map"]["classifier.weight"] == last
        sizes = sum(
            np.prod(t.shape) * 4
            for f in (tmp_path / "merged").glob("*.safetensors")
            for t in _tensors(f).values()
        )
        assert index["metadata"]["total_size"] == sizes
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(tmp_path / "merged")
    ).eval()
    assert merged.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    ids = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(merged, ids), _logits(trained, ids), atol=1e-5, rtol=0)
    # the base is untouched
    assert not (base / "config.json").read_text().count("BertForSequenceClassification")


def _tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def test_bf16_merge_says_bfloat16_in_config(tmp_path: Path) -> None:
    base = _base(tmp_path / "base")
    cfg = json.loads((base / "config.json").read_text())
    cfg["torch_dtype"] = "float32"  # an older transformers wrote this key
    (base / "config.json").write_text(json.dumps(cfg))
    _task_adapter(base, tmp_path / "adapter")
    result = ur.merge(base, tmp_path / "adapter", tmp_path / "merged", dtype="bf16")
    assert {"dtype", "torch_dtype"} <= set(result.config_keys)
    out = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert out["dtype"] == "bfloat16" and out["torch_dtype"] == "bfloat16"
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(tmp_path / "merged"), dtype="auto"
    )
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    from safetensors import safe_open

    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("classifier.weight").dtype == torch.bfloat16


def test_head_without_task_record_is_refused(tmp_path: Path) -> None:
    base = _base(tmp_path / "base")
    _task_adapter(base, tmp_path / "adapter", with_task=False)
    # without a task record the head has no place in the base: refused, nothing written
    with pytest.raises(
        MismatchError, match=r"classifier\.(bias|weight).*the base has no tensor.*new_tensors"
    ):
        ur.merge(base, tmp_path / "adapter", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_task_naming_a_missing_tensor_is_refused(tmp_path: Path) -> None:
    base = _base(tmp_path / "base")
    _task_adapter(base, tmp_path / "adapter")
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["task"]["new_tensors"].append("classifier.extra")
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=r"classifier\.extra"):
        ur.merge(base, tmp_path / "adapter", tmp_path / "merged")
    cfg["task"] = {"type": "regression"}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=r"task\.type must be one of"):
        ur.load_adapter_config(tmp_path / "adapter")


def test_each_task_adapter_gets_its_own_head_in_one_pass(tmp_path: Path) -> None:
    base = _base(tmp_path / "base", "60KB")
    names = ("first", "second")
    trained = {n: _task_adapter(base, tmp_path / n) for n in names}
    each = ur.merge_each(base, [tmp_path / n for n in names], tmp_path / "out")
    ids = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(1))
    for name, result in zip(names, each.results, strict=True):
        assert sorted(result.added) == ["classifier.bias", "classifier.weight"]
        alone = ur.merge(base, tmp_path / name, tmp_path / "alone" / name)
        for f in sorted(alone.out.rglob("*")):
            if f.is_file():
                assert (result.out / f.relative_to(alone.out)).read_bytes() == f.read_bytes()
        merged = transformers.AutoModelForSequenceClassification.from_pretrained(
            str(result.out)
        ).eval()
        torch.testing.assert_close(
            _logits(merged, ids), _logits(trained[name], ids), atol=1e-5, rtol=0
        )
    # Two heads cannot be averaged: a weighted merge refuses them, writing nothing.
    with pytest.raises(InvalidArgumentError, match="one adapter only"):
        ur.merge_weighted(base, [tmp_path / n for n in names], [0.5, 0.5], tmp_path / "w")
    assert not (tmp_path / "w").exists()
