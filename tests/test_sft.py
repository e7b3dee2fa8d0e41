"""Instruction tuning (``unilora train --task sft``): data formats, answer-only labels,
truncation, generation, gradient accumulation and the command line, on a tiny Llama
with SmolLM2's real tokenizer and chat template."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from unilora_rs.conversations import SftExample, sft_examples  # noqa: E402
from unilora_rs.datasets import packaged_llm_gguf, packaged_model_dir  # noqa: E402
from unilora_rs.errors import InvalidArgumentError  # noqa: E402
from unilora_rs.torch import UniLoRAConfig, UniLoRAModel, get_unilora_model  # noqa: E402
from unilora_rs.torch.training import (  # noqa: E402
    EvalPrompt,
    LoopOptions,
    batches,
    encode_sft,
    eval_prompts,
    exact_match,
    generate_answers,
    normalize_answer,
    stop_token_ids,
    train_loop,
)
from unilora_rs.torch.training.loop import lr_factor  # noqa: E402

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
Q = "Is this review positive or negative? "


def _cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "unilora_rs", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        check=False,
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved with SmolLM2-135M-Instruct's tokenizer (chat template)."""
    gguf = packaged_llm_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tok(tiny: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(str(tiny))


def _chat(text: str, answer: str) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": Q + text},
            {"role": "assistant", "content": answer},
        ]
    }


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ data formats


def test_formats_are_detected() -> None:
    pc = sft_examples([{"prompt": "2+2=", "completion": "4"}])
    assert pc == [SftExample("prompt/completion", prompt="2+2=", answer="4")]
    chat = sft_examples([_chat("good", "positive")])
    assert chat[0].chat and chat[0].reference() == (1, "positive")
    conv = sft_examples(
        [
            {
                "prompt": [{"role": "user", "content": "hi"}],
                "completion": [{"role": "assistant", "content": "hello"}],
            }
        ]
    )
    assert conv[0].answer_from == 1 and conv[0].reference() == (1, "hello")
    text = sft_examples([{"text": "plain words"}])
    assert text[0].format == "text" and text[0].reference() is None


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"prompt": "a", "completion": "b"}, _chat("x", "y")], "mix formats"),
        ([{"text": "a"}, {"prompt": "a", "completion": "b"}], "mix formats"),
        ([{"messages": [{"role": "robot", "content": "x"}]}], "unknown role 'robot'"),
        ([_chat("x", "  ")], "empty answer"),
        ([{"prompt": "a", "completion": ""}], "empty answer"),
        ([{"messages": [{"role": "user", "content": "x"}]}], "no assistant message"),
        ([{"messages": "[{'role': 'user'}]"}], "CSV/TSV cells cannot hold them"),
        ([{"messages": [{"role": "user", "content": 3}]}], "must be a string"),
        ([{"question": "a"}], "none of the columns"),
        ([], "no examples"),
    ],
)
def test_bad_rows_are_refused(rows: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        sft_examples(rows, source="d.jsonl")


# ------------------------------------------------------------------------------ labels


def _trained_text(tok: Any, enc: dict[str, list[int]]) -> str:
    return str(tok.decode([t for t in enc["labels"] if t != -100]))


def test_chat_labels_cover_the_answer_and_end_of_turn_only(tok: Any) -> None:
    ex = sft_examples([_chat("A gripping film.", "positive")])
    (enc,), kept, report = encode_sft(tok, ex, 256, stops=stop_token_ids(tok))
    assert kept == [0] and report.as_dict() == {"examples": 1, "cut": 0, "skipped": 0}
    assert _trained_text(tok, enc) == "positive<|im_end|>"
    # the rendered conversation is the chat template's, token for token
    full = tok.apply_chat_template(
        [{"role": r, "content": c} for r, c in ex[0].messages], tokenize=False
    )
    assert enc["input_ids"] == tok(full, add_special_tokens=False)["input_ids"]
    # generation starts from exactly the prompt part of the training sequence
    (prompt,), _ = eval_prompts(tok, ex, 256)
    assert enc["input_ids"][: len(prompt.prompt_ids)] == prompt.prompt_ids
    assert prompt.prompt_text.endswith("<|im_start|>assistant\n")


def test_multi_turn_trains_every_assistant_turn(tok: Any) -> None:
    msgs = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    ex = sft_examples([{"messages": msgs}])
    (enc,), _, _ = encode_sft(tok, ex, 256, stops=stop_token_ids(tok))
    assert _trained_text(tok, enc) == "Hello.<|im_end|>4<|im_end|>"
    (prompt,), _ = eval_prompts(tok, ex, 256)
    assert prompt.reference == "4" and "Hello." in prompt.prompt_text


def test_prompt_completion_appends_eos_and_train_on_prompt(tok: Any) -> None:
    ex = sft_examples([{"prompt": "Review: fine\nSentiment:", "completion": " positive"}])
    stops = stop_token_ids(tok)
    (enc,), _, _ = encode_sft(tok, ex, 256, stops=stops)
    assert enc["input_ids"][-1] == tok.eos_token_id
    assert _trained_text(tok, enc) == " positive" + tok.eos_token
    (everything,), _, _ = encode_sft(tok, ex, 256, stops=stops, train_on_prompt=True)
    assert everything["labels"] == everything["input_ids"]


def test_truncation_is_counted_and_never_silent(tok: Any) -> None:
    long_answer = " ".join(["word"] * 40)
    ex = sft_examples(
        [
            {"prompt": "short", "completion": "ok"},
            {"prompt": "short", "completion": long_answer},
            {"prompt": " ".join(["very"] * 60), "completion": "gone"},
        ]
    )
    enc, kept, report = encode_sft(tok, ex, 24, stops=stop_token_ids(tok))
    assert kept == [0, 1]
    assert report.as_dict() == {"examples": 3, "cut": 1, "skipped": 1}
    assert all(len(e["input_ids"]) <= 24 for e in enc)
    with pytest.raises(InvalidArgumentError, match="loses its whole answer"):
        encode_sft(tok, ex[2:], 24, stops=stop_token_ids(tok))


def test_messages_need_a_chat_template() -> None:
    bert = transformers.AutoTokenizer.from_pretrained(str(packaged_model_dir()))
    with pytest.raises(InvalidArgumentError, match="need a chat template"):
        encode_sft(bert, sft_examples([_chat("x", "y")]), 64, stops=[bert.sep_token_id])


# ------------------------------------------------------------------------------ generation


@pytest.mark.parametrize(
    ("generated", "reference", "same"),
    [
        ("Positive.", "positive", True),
        ("  positive\n", "positive", True),
        ('"Negative!"', "negative", True),
        ("positive review", "positive", False),
        ("New   York", "new york", True),
    ],
)
def test_exact_match_normalisation(generated: str, reference: str, same: bool) -> None:
    assert exact_match(generated, reference) is same
    assert normalize_answer(" A  b. ") == "a b"


def _wrapped(folder: Path, seed: int = 0) -> UniLoRAModel:
    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(folder))
    return get_unilora_model(
        base, UniLoRAConfig(rank=4, vector_length=300, target_modules="all-linear", seed=seed)
    )


def test_batched_greedy_equals_one_by_one(tiny: Path, tok: Any) -> None:
    """Left-padded batches give the answers that unpadded single prompts give."""
    model = _wrapped(tiny).eval()
    with torch.no_grad():
        model.theta_d.uniform_(-0.5, 0.5)
    ex = sft_examples([_chat("x" * n, "positive") for n in (1, 7, 30, 90)])
    prompts, _ = eval_prompts(tok, ex, 256)
    stops = stop_token_ids(tok, model)
    batched = generate_answers(model, tok, prompts, max_new_tokens=6, stops=stops, batch_size=4)
    for p, got in zip(prompts, batched, strict=True):
        ids = torch.tensor([p.prompt_ids])
        out = model.generate(
            input_ids=ids, max_new_tokens=6, do_sample=False, eos_token_id=stops, pad_token_id=2
        )[0, ids.shape[1] :].tolist()
        cut = next((i for i, t in enumerate(out) if t in stops), len(out))
        assert got == tok.decode(out[:cut], skip_special_tokens=True).strip()


# ------------------------------------------------------------------------------ the loop


def test_gradient_accumulation_equals_one_large_batch(tiny: Path, tok: Any) -> None:
    ex = sft_examples([_chat(f"review number {i} " * (1 + i % 5), "positive") for i in range(8)])
    enc, _, _ = encode_sft(tok, ex, 256, stops=stop_token_ids(tok))
    thetas = []
    for size, accum in ((8, 1), (4, 2), (2, 4)):
        model = _wrapped(tiny)
        data = batches(enc, ex, tok, size, "sft", shuffle=True, seed=3)
        train_loop(
            model,
            [{"params": [model.theta_d], "lr": 1e-2}],
            lambda epoch, data=data: data,
            task="sft",
            options=LoopOptions(epochs=1, grad_accum=accum, warmup_ratio=0.0, progress=False),
        )
        thetas.append(model.theta_d.detach().clone())
    assert torch.allclose(thetas[0], thetas[1], atol=1e-6, rtol=0)
    assert torch.allclose(thetas[0], thetas[2], atol=1e-6, rtol=0)


def test_answer_only_loss_skips_logits_and_keeps_loss_and_gradient(tiny: Path, tok: Any) -> None:
    """The loss asks the model for the logits before answer tokens only; the loss and
    theta_d's gradient equal torch's cross-entropy over the full logits."""
    from unilora_rs.torch.training.loop import lm_logits, loss_sum

    ex = sft_examples([_chat(f"review {i} " * (1 + i % 4), "positive") for i in range(6)])
    enc, _, _ = encode_sft(tok, ex, 256, stops=stop_token_ids(tok))
    batch = batches(enc, ex, tok, 6, "sft", shuffle=False)[0]
    model = _wrapped(tiny)
    with torch.no_grad():
        model.theta_d.uniform_(-0.3, 0.3)
    logits, positions = lm_logits(model, batch)
    assert positions is not None and logits.shape[1] == len(positions)
    assert logits.shape[1] < batch.labels.shape[1] // 2  # most positions skipped
    got = loss_sum(model, batch, "sft")
    got.backward()
    grad = model.theta_d.grad.clone()
    model.theta_d.grad = None
    full = model(**batch.inputs).logits  # the reference: every position
    want = torch.nn.functional.cross_entropy(
        full[:, :-1].reshape(-1, full.shape[-1]).float(),
        batch.labels[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    want.backward()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert torch.allclose(grad, model.theta_d.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_lr_schedules(kind: str) -> None:
    f = lr_factor(kind, warmup=4, total=24)
    assert [f(s) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    expected = {
        "linear": lambda s: (24 - s) / 20,
        "cosine": lambda s: 0.5 * (1 + math.cos(math.pi * (s - 4) / 20)),
        "constant": lambda s: 1.0,
    }[kind]
    assert [f(s) for s in range(4, 25)] == pytest.approx([expected(s) for s in range(4, 25)])


# ------------------------------------------------------------------------------ the command


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory: pytest.TempPathFactory, tiny: Path) -> Path:
    tmp = tmp_path_factory.mktemp("sft")
    words = ["good", "bad", "fine", "awful", "great", "poor"]
    rows = [
        _chat(f"{words[i % 6]} film {i}", "positive" if i % 2 == 0 else "negative")
        for i in range(48)
    ]
    data = _write_jsonl(tmp / "chat.jsonl", rows)
    out = tmp / "run"
    proc = _cli(
        "train", "--task", "sft", "--model", str(tiny), "--data", str(data), "--out", str(out),
        "--max-steps", "4", "--batch-size", "4", "--gradient-accumulation-steps", "2",
        "--eval-steps", "2", "--lr-scheduler", "cosine", "--eval-base", "--no-progress",
        "--threads", "2", "--eval-fraction", "0.25",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exact match" in proc.stdout and "eval_samples.jsonl" in proc.stdout
    return out


def test_sft_writes_adapter_metrics_and_samples(sft_run: Path) -> None:
    m = json.loads((sft_run / "metrics.json").read_text())
    assert m["task"] == "sft" and m["target_modules"] == "all-linear"
    assert m["eval_generated"] == 12 and 0.0 <= m["eval_exact_match"] <= 1.0
    assert m["base"]["eval_generated"] == 12 and "eval_loss" in m["base"]
    assert m["truncation"]["train"] == {"examples": 36, "cut": 0, "skipped": 0}
    assert m["steps"] == 4 and m["gradient_accumulation_steps"] == 2
    assert [h["steps"] for h in m["history"]] == [2, 4]  # every 2 steps and at the end
    samples = [json.loads(x) for x in (sft_run / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 12
    assert {"prompt", "reference", "generated", "exact_match", "base_generated"} <= set(samples[0])
    hits = sum(exact_match(s["generated"], s["reference"]) for s in samples)
    assert hits / 12 == pytest.approx(m["eval_exact_match"])
    cfg = json.loads((sft_run / "adapter_config.json").read_text())
    assert cfg["task"]["type"] == "causal-lm"


def test_saved_adapter_reproduces_the_generated_answers(
    sft_run: Path, tiny: Path, tok: Any
) -> None:
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tiny))
    model = UniLoRAModel.from_pretrained(base, sft_run)
    m = json.loads((sft_run / "metrics.json").read_text())
    samples = [json.loads(x) for x in (sft_run / "eval_samples.jsonl").read_text().splitlines()]
    prompts = [
        EvalPrompt(s["row"], tok(s["prompt"], add_special_tokens=False)["input_ids"],
                   s["prompt"], s["reference"])
        for s in samples
    ]  # fmt: skip
    got = generate_answers(
        model, tok, prompts, max_new_tokens=m["max_new_tokens"],
        stops=stop_token_ids(tok, model), batch_size=4,
    )  # fmt: skip
    assert got == [s["generated"] for s in samples]
    with model.disable_adapter():
        base_answers = generate_answers(
            model, tok, prompts, max_new_tokens=m["max_new_tokens"],
            stops=stop_token_ids(tok, model), batch_size=4,
        )  # fmt: skip
    assert base_answers == [s["base_generated"] for s in samples]


@pytest.mark.parametrize(
    ("rows", "extra", "message"),
    [
        ([_chat("x", "y")] * 5 + [{"prompt": "a", "completion": "b"}] * 5, [], "mix formats"),
        ([{"messages": [{"role": "bot", "content": "x"}]}] * 10, [], "unknown role 'bot'"),
        ([_chat("x", "")] * 10, [], "empty answer"),
        ([_chat("word " * 80, "positive")] * 10, ["--max-length", "40"], "loses its whole answer"),
    ],
)
def test_sft_bad_input_gives_one_line(
    tmp_path: Path, tiny: Path, rows: list[dict[str, Any]], extra: list[str], message: str
) -> None:
    data = _write_jsonl(tmp_path / "d.jsonl", rows)
    proc = _cli(
        "train", "--task", "sft", "--model", str(tiny), "--data", str(data),
        "--out", str(tmp_path / "out"), "--no-progress", *extra,
    )  # fmt: skip
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert message in lines[-1] and lines[-1].startswith("unilora: error:")
    assert "Traceback" not in proc.stderr


def test_messages_without_a_chat_template_give_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "no-template"
    tok = transformers.AutoTokenizer.from_pretrained(str(packaged_model_dir()))
    cfg = transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
    )  # fmt: skip
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    data = _write_jsonl(tmp_path / "d.jsonl", [_chat("x", "y")] * 10)
    proc = _cli("train", "--task", "sft", "--model", str(folder), "--data", str(data),
                "--out", str(tmp_path / "out"), "--no-progress")  # fmt: skip
    assert proc.returncode == 1 and "need a chat template" in proc.stderr


def test_gradient_checkpointing_and_accumulation_flags_keep_the_result(
    tmp_path: Path, tiny: Path
) -> None:
    """--gradient-checkpointing changes memory, not the trained vector; two batches of 4
    accumulated equal one batch of 8."""
    rows = [_chat(f"film number {i} " * (1 + i % 4), "positive") for i in range(16)]
    data = _write_jsonl(tmp_path / "d.jsonl", rows)
    common = ["train", "--task", "sft", "--model", str(tiny), "--data", str(data),
              "--eval-fraction", "0.25", "--max-steps", "1", "--generate-examples", "0",
              "--no-progress", "--threads", "1"]  # fmt: skip
    thetas = []
    for i, extra in enumerate(
        (["--batch-size", "8"], ["--batch-size", "8", "--gradient-checkpointing"],
         ["--batch-size", "4", "--gradient-accumulation-steps", "2"],
         ["--batch-size", "8", "--lr", "1e-12"])
    ):  # fmt: skip
        proc = _cli(*common, "--out", str(tmp_path / f"o{i}"), *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
        thetas.append(UniLoRAModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(str(tiny)), tmp_path / f"o{i}"
        ).theta_d.detach())  # fmt: skip
    assert torch.allclose(thetas[0], thetas[1], atol=1e-6, rtol=0)
    assert torch.allclose(thetas[0], thetas[2], atol=1e-6, rtol=0)
    assert not torch.allclose(thetas[0], thetas[3], atol=1e-4, rtol=0)  # the step moved it
