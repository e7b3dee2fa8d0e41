"""The runnable examples run to completion and check their own results."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_end_to_end_example(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "end_to_end.py"),
            "--steps",
            "30",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("OK")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "merged" / "model.safetensors").exists()
    assert (tmp_path / "lora" / "adapter_model.safetensors").exists()


def test_trainer_causal_lm_example(tmp_path: Path) -> None:
    """transformers.Trainer trains a Uni-LoRA causal LM on real dialog text (tiny model
    here; the example's default is SmolLM2-135M) and the held-out loss falls."""
    from test_train import _tiny_causal_lm

    model = _tiny_causal_lm(tmp_path / "tiny")
    record = tmp_path / "record.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "trainer_causal_lm.py"),
            "--model",
            str(model),
            "--train",
            "200",
            "--eval",
            "50",
            "--steps",
            "12",
            "--lr",
            "5e-2",
            "--out",
            str(tmp_path / "adapter"),
            "--record",
            str(record),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    import json

    r = json.loads(record.read_text())
    assert r["eval_loss_after"] < r["eval_loss_before"]
    assert (tmp_path / "adapter" / "adapter_config.json").exists()


def test_trainer_accepts_a_wrapped_quantized_base() -> None:
    """The Trainer refuses to fine-tune a quantized base alone; with Uni-LoRA attached
    (theta_d trainable) it accepts it, as it does PEFT models."""
    from types import SimpleNamespace

    from tiny_models import tiny_llama
    from transformers.trainer_utils import validate_quantization_for_training
    from unilora_rs.torch import UniLoRAConfig, get_unilora_model

    base = tiny_llama()
    base.is_quantized = True  # what a GGUF / bitsandbytes load leaves on the model
    base.hf_quantizer = SimpleNamespace(
        is_trainable=False,
        is_qat_trainable=False,
        quantization_config=SimpleNamespace(quant_method="gguf"),
    )
    with pytest.raises(ValueError, match="purely quantized"):
        validate_quantization_for_training(base)
    model = get_unilora_model(
        base, UniLoRAConfig(rank=2, vector_length=64, target_modules="all-linear")
    )
    validate_quantization_for_training(model)


def test_offline_pipeline_imports_no_torch(tmp_path: Path) -> None:
    import random

    from test_train import _cli, _write_csv
    from unilora_rs.datasets import sentiment_sentences

    rows = sentiment_sentences()
    random.Random(1).shuffle(rows)
    data = _write_csv(tmp_path / "d.csv", rows[:64])
    train = _cli(
        "train",
        "--data",
        str(data),
        "--max-steps",
        "1",
        "--batch-size",
        "8",
        "--out",
        str(tmp_path / "adapter"),
        "--no-progress",
    )
    assert train.returncode == 0, train.stderr[-2000:]
    proc = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "offline_pipeline.py"),
            "--adapter",
            str(tmp_path / "adapter"),
            "--out",
            str(tmp_path / "out"),
            "--dtype",
            "bf16",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "torch was never imported: OK" in proc.stdout
    import json

    cfg = json.loads((tmp_path / "out" / "merged" / "config.json").read_text())
    assert cfg["architectures"] == ["BertForSequenceClassification"]
    assert cfg["dtype"] == "bfloat16"
    assert (tmp_path / "out" / "lora" / "adapter_model.safetensors").exists()
