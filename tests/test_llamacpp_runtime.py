"""llama.cpp itself (llama-cpp-python) runs a tiny Llama base GGUF made by llama.cpp's
convert_hf_to_gguf.py with the LoRA GGUF of export-gguf, and gives the logits of the
merged model (``unilora merge`` + transformers)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import unilora_rs as ur
from llamacpp_helpers import run_converter
from merge_helpers import write_adapter
from test_export_gguf import adapted_modules

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")
llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (requirements/llamacpp.txt)"
)

torch.set_num_threads(1)


def tiny_llama_folder(base: Path) -> torch.nn.Module:
    """A tiny Llama with a SentencePiece tokenizer trained here (the converter needs one)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(base)
    text = ["alpha beta gamma delta", "the quick brown fox", "one vector is all you need"] * 20
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_writer=buf,
        vocab_size=60,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (base / "tokenizer.model").write_bytes(buf.getvalue())
    return model


def llama_cpp_logits(model: Path, lora: Path | None, ids: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(
        model_path=str(model),
        lora_path=None if lora is None else str(lora),
        n_ctx=64,
        n_batch=64,
        n_threads=1,
        logits_all=True,
        verbose=False,
    )
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


@pytest.mark.slow
def test_llama_cpp_runs_the_lora_gguf(tmp_path: Path) -> None:
    base = tmp_path / "base"
    model = tiny_llama_folder(base)
    done = run_converter(
        "convert_hf_to_gguf.py", base, "--outtype", "f32", "--outfile", tmp_path / "base.gguf"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    write_adapter(tmp_path / "ad", adapted_modules(model), rank=4, alpha=6.0, d=600)
    ur.export_gguf(tmp_path / "ad", tmp_path / "lora.gguf", base=base)
    ur.merge(base, tmp_path / "ad", tmp_path / "merged")

    ids = [3, 17, 5, 40, 22, 9, 11, 30]
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        want = merged(torch.tensor([ids])).logits[0].numpy()
        plain = model(torch.tensor([ids])).logits[0].numpy()
    got = llama_cpp_logits(tmp_path / "base.gguf", tmp_path / "lora.gguf", ids)
    got_base = llama_cpp_logits(tmp_path / "base.gguf", None, ids)

    effect = np.abs(want - plain).max()
    assert effect > 0.1  # the adapter changes the logits a lot ...
    # ... and llama.cpp with the LoRA GGUF agrees with the merged model as closely as
    # llama.cpp's base alone agrees with transformers' base (float32 throughout; the
    # differences are summation order and llama.cpp's f16 KV cache: measured 8e-5, 6e-5).
    base_err = np.abs(got_base - plain).max()
    assert base_err < 1e-3
    assert np.abs(got - want).max() < max(2 * base_err, 2e-4)
