"""TRL's SFTTrainer training a Uni-LoRA model (UniLoRASFTTrainer), on a tiny Llama with
SmolLM2's tokenizer: only theta_d changes, checkpoints are adapter folders, resuming
gives the uninterrupted run, packing keeps document boundaries, and what TRL cannot do
with a Uni-LoRA model is refused with a message."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")
pytest.importorskip("gguf")

from unilora_rs.datasets import packaged_llm_gguf  # noqa: E402
from unilora_rs.errors import InvalidArgumentError  # noqa: E402
from unilora_rs.torch import UniLoRAConfig, UniLoRAModel, get_unilora_model  # noqa: E402
from unilora_rs.torch.training.trl_trainer import UniLoRASFTTrainer  # noqa: E402


@pytest.fixture(scope="module")
def tok() -> Any:
    gguf = packaged_llm_gguf()
    return transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _base(tok: Any) -> Any:
    """The same tiny random Llama each call."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def _model(tok: Any, targets: Any = "all-linear") -> UniLoRAModel:
    return get_unilora_model(
        _base(tok), UniLoRAConfig(rank=4, vector_length=512, target_modules=targets, seed=7)
    )


def _prompt_completion(n: int = 24) -> Any:
    return datasets.Dataset.from_list(
        [{"prompt": f"Q: what follows {i}? A:", "completion": f" {i + 1}."} for i in range(n)]
    )


def _messages(n: int = 24) -> Any:
    return datasets.Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": f"What follows {i}?"},
                    {"role": "assistant", "content": f"{i + 1}."},
                ]
            }
            for i in range(n)
        ]
    )


def _config(out: Path, **kw: Any) -> Any:
    args: dict[str, Any] = {
        "output_dir": str(out), "max_steps": 12, "per_device_train_batch_size": 4,
        "learning_rate": 2e-2, "lr_scheduler_type": "constant", "logging_steps": 1,
        "report_to": [], "use_cpu": True, "save_strategy": "steps", "save_steps": 6,
        "max_length": 64, "seed": 0, "data_seed": 0, "bf16": False,
        "activation_checkpointing": False, "dataloader_num_workers": 0,
    }  # fmt: skip
    args.update(kw)
    return trl.SFTConfig(**args)


def _losses(trainer: Any) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("data", [_prompt_completion, _messages])
def test_sft_trains_theta_d_only_and_checkpoints_adapters(tmp_path: Path, tok: Any, data) -> None:
    model = _model(tok)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer = UniLoRASFTTrainer(
        model=model, args=_config(tmp_path), train_dataset=data(), processing_class=tok
    )
    trainer.train()
    changed = [k for k, v in model.named_parameters() if not torch.equal(before[k], v.detach())]
    assert changed == ["theta_d"]
    losses = _losses(trainer)
    assert sum(losses[-4:]) < sum(losses[:4])
    for ck in sorted(tmp_path.glob("checkpoint-*")):
        names = {p.name for p in ck.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= names
        assert not any(n.startswith("model") and n.endswith(".safetensors") for n in names)
    # a checkpoint loads back onto a fresh base and gives the trained model's logits
    loaded = UniLoRAModel.from_pretrained(_base(tok), tmp_path / "checkpoint-12")
    ids = torch.tensor([tok("Q: what follows 3? A:")["input_ids"]])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_completion_only_labels(tmp_path: Path, tok: Any) -> None:
    trainer = UniLoRASFTTrainer(
        model=_model(tok), args=_config(tmp_path), train_dataset=_prompt_completion(),
        processing_class=tok,
    )  # fmt: skip
    row = trainer.train_dataset[0]
    batch = trainer.data_collator([row])
    labels = batch["labels"][0].tolist()
    trained = [t for t, lab in zip(row["input_ids"], labels, strict=True) if lab != -100]
    assert tok.decode(trained) == " 1.<|im_end|>"


def test_resume_gives_the_uninterrupted_run(tmp_path: Path, tok: Any) -> None:
    model = _model(tok)
    ref = UniLoRASFTTrainer(
        model=model, args=_config(tmp_path), train_dataset=_prompt_completion(),
        processing_class=tok,
    )  # fmt: skip
    ref.train()
    resumed_model = _model(tok)
    resumed = UniLoRASFTTrainer(
        model=resumed_model, args=_config(tmp_path), train_dataset=_prompt_completion(),
        processing_class=tok,
    )  # fmt: skip
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
    assert torch.allclose(resumed_model.theta_d, model.theta_d, atol=1e-6, rtol=0)
    assert _losses(resumed)[-6:] == pytest.approx(_losses(ref)[-6:], abs=1e-6)


def test_packing_keeps_document_boundaries(tmp_path: Path, tok: Any) -> None:
    trainer = UniLoRASFTTrainer(
        model=_model(tok), args=_config(tmp_path, packing=True, max_steps=2),
        train_dataset=_prompt_completion(), processing_class=tok,
    )  # fmt: skip
    assert "seq_lengths" in trainer.train_dataset.column_names
    batch = next(iter(trainer.get_train_dataloader()))
    positions = batch["position_ids"][0].tolist()
    assert positions.count(0) > 1  # several documents, each counted from 0
    trainer.train()


def test_what_trl_cannot_do_is_refused(tmp_path: Path, tok: Any) -> None:
    peft = pytest.importorskip("peft")
    with pytest.raises(InvalidArgumentError, match="not a model id"):
        UniLoRASFTTrainer(model="some/model", args=_config(tmp_path))
    with pytest.raises(InvalidArgumentError, match="peft_config"):
        UniLoRASFTTrainer(
            model=_model(tok), args=_config(tmp_path), train_dataset=_prompt_completion(),
            processing_class=tok, peft_config=peft.LoraConfig(),
        )  # fmt: skip
    with_head = _model(tok, targets=r".*(q_proj|lm_head)")
    with pytest.raises(InvalidArgumentError, match=r"lm_head\.weight directly"):
        UniLoRASFTTrainer(
            model=with_head, args=_config(tmp_path), train_dataset=_prompt_completion(),
            processing_class=tok,
        )  # fmt: skip
