"""train -> GGUF -> llama.cpp on other architectures and other label words: a tiny Llama
and a tiny Qwen2 (SmolLM2's BPE tokenizer, which llama.cpp's converter knows, and a
ChatML chat template) are instruction-tuned with `unilora train --task sft`, their base
converted by llama.cpp's convert_hf_to_gguf.py, the adapter by `unilora export-gguf`,
and llama.cpp answers the held-out prompts as torch did."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from llamacpp_helpers import run_converter

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (requirements/llamacpp.txt)"
)

import unilora_rs as ur  # noqa: E402
from unilora_rs.datasets import packaged_llm_gguf  # noqa: E402
from unilora_rs.torch.training import normalize_answer  # noqa: E402

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
COLOURS = ["red", "green", "blue"]


def _base(folder: Path, arch: str) -> Path:
    gguf = packaged_llm_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.chat_template = CHATML  # no default system prompt: another template than SmolLM2's
    common = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _rows(n: int) -> list[dict[str, Any]]:
    """Which colour a made-up object is, from a fixed rule the model can learn."""
    objects = ["apple", "leaf", "sky", "brick", "frog", "sea", "rose", "grass", "ocean"]
    return [
        {
            "messages": [
                {"role": "user", "content": f"What colour is the {objects[i % 9]} number {i}?"},
                {"role": "assistant", "content": COLOURS[(i % 9) % 3]},
            ]
        }
        for i in range(n)
    ]


def _llama_cpp_answers(
    base_gguf: Path, lora: Path, prompts: list[list[int]], tok: Any
) -> list[str]:
    llm = llama_cpp.Llama(
        model_path=str(base_gguf), lora_path=str(lora), n_ctx=128, n_threads=1, verbose=False
    )
    out = []
    for ids in prompts:
        got: list[int] = []
        for t in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            if t == tok.eos_token_id or len(got) >= 4:
                break
            got.append(t)
        out.append(tok.decode(got, skip_special_tokens=True).strip())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_sft_adapter_runs_in_llama_cpp(tmp_path: Path, arch: str) -> None:
    base = _base(tmp_path / "base", arch)
    done = run_converter(
        "convert_hf_to_gguf.py", base, "--outtype", "f32", "--outfile", tmp_path / "base.gguf"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    train = tmp_path / "train.jsonl"
    held = tmp_path / "held.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in _rows(96)))
    held.write_text("".join(json.dumps(r) + "\n" for r in _rows(120)[96:]))
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "unilora_rs", "train", "--task", "sft", "--model", str(base),
         "--data", str(train), "--eval-data", str(held), "--out", str(out),
         "--epochs", "3", "--lr", "0.05", "--eval-base", "--no-progress", "--threads", "1"],
        capture_output=True, text=True, env=ENV, timeout=1200, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    # the adapter learned (a random base gains little exact match in 36 steps, but the
    # held-out loss of the answers falls well below the base's)
    assert metrics["eval_loss"] < 0.5 * metrics["base"]["eval_loss"], metrics
    ur.export_gguf(out, tmp_path / "lora.gguf", base=base)
    tok = transformers.AutoTokenizer.from_pretrained(str(base))
    samples = [json.loads(x) for x in (out / "eval_samples.jsonl").read_text().splitlines()]
    prompts = [tok(s["prompt"], add_special_tokens=False)["input_ids"] for s in samples]
    cpp = _llama_cpp_answers(tmp_path / "base.gguf", tmp_path / "lora.gguf", prompts, tok)
    same = [
        normalize_answer(a) == normalize_answer(s["generated"])
        for a, s in zip(cpp, samples, strict=True)
    ]
    assert sum(same) / len(same) >= 0.95, list(
        zip(cpp, [s["generated"] for s in samples], strict=True)
    )
