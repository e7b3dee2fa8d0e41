"""Judging a causal LM by what it generates: batched greedy decoding of held-out
prompts and exact-match against the reference answers."""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..._util import write_bytes_atomic
from .sft import EvalPrompt

__all__ = ["exact_match", "generate_answers", "judge", "normalize_answer", "write_samples"]

#: Exact-match is reported when every reference answer has at most this many tokens
#: (longer answers are judged by the held-out loss; the samples are written anyway).
SHORT_ANSWER_TOKENS = 32

_STRIP = string.punctuation + string.whitespace


def normalize_answer(text: str) -> str:
    """Lower case, inner white space collapsed, surrounding punctuation and space removed."""
    return " ".join(text.lower().split()).strip(_STRIP)


def exact_match(generated: str, reference: str) -> bool:
    """Equal after :func:`normalize_answer`."""
    return normalize_answer(generated) == normalize_answer(reference)


def _left_padded(
    prompts: Sequence[EvalPrompt], pad_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    width = max(len(p.prompt_ids) for p in prompts)
    ids = [[pad_id] * (width - len(p.prompt_ids)) + p.prompt_ids for p in prompts]
    mask = [[0] * (width - len(p.prompt_ids)) + [1] * len(p.prompt_ids) for p in prompts]
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long, device=device),
        "attention_mask": torch.tensor(mask, dtype=torch.long, device=device),
    }


def _decode(tokenizer: Any, ids: Sequence[int], stops: set[int]) -> str:
    out = []
    for t in ids:
        if t in stops:
            break
        out.append(int(t))
    return str(tokenizer.decode(out, skip_special_tokens=True)).strip()


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[EvalPrompt],
    *,
    max_new_tokens: int,
    stops: Sequence[int],
    batch_size: int = 16,
    device: torch.device | str = "cpu",
) -> list[str]:
    """Greedy answers to ``prompts`` (left-padded batches, longest first; decoding stops
    at any of ``stops``), in the order of ``prompts``."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i].prompt_ids))
    answers = [""] * len(prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            inputs = _left_padded([prompts[i] for i in rows], pad_id, torch.device(device))
            out = model.generate(  # type: ignore[operator]
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=list(stops),
                pad_token_id=pad_id,
            )
            width = inputs["input_ids"].shape[1]
            for i, seq in zip(rows, out[:, width:].tolist(), strict=True):
                answers[i] = _decode(tokenizer, seq, set(stops))
    finally:
        model.train(was_training)
    return answers


def judge(
    prompts: Sequence[EvalPrompt], answers: Sequence[str], reference_tokens: int
) -> dict[str, Any]:
    """``eval_exact_match`` (when the references are short) and the number judged."""
    out: dict[str, Any] = {"eval_generated": len(prompts)}
    if prompts and reference_tokens <= SHORT_ANSWER_TOKENS:
        hits = sum(exact_match(a, p.reference) for p, a in zip(prompts, answers, strict=True))
        out["eval_exact_match"] = hits / len(prompts)
    return out


def write_samples(
    path: Path, prompts: Sequence[EvalPrompt], answers: Sequence[str], **columns: Sequence[str]
) -> None:
    """``eval_samples.jsonl``: prompt, reference, generated (and ``columns``, e.g. the
    base model's answers) per held-out prompt; written atomically and size-checked."""
    lines = []
    for k, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        row: dict[str, Any] = {
            "row": p.row,
            "prompt": p.prompt_text,
            "reference": p.reference,
            "generated": a,
            "exact_match": exact_match(a, p.reference),
        }
        for name, values in columns.items():
            row[name] = values[k]
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    write_bytes_atomic(path, "".join(lines).encode("utf-8"))
