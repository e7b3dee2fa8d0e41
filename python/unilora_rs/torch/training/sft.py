"""Tokenizing instruction data: answer-only labels, EOS, truncation that is counted.

A sequence is built from pieces tokenized one by one, so that the prompt part is
exactly the token sequence that generation later starts from:

* prompt / completion strings: ``tokenize(prompt)`` (with the tokenizer's special
  tokens, e.g. BOS) + ``tokenize(completion)`` + EOS;
* conversational rows: the chat template renders the conversation; for every answer
  turn the text up to it (with the generation prompt) and the turn itself are
  consecutive pieces, each tokenized without added special tokens (the template
  writes them);
* plain text: ``tokenize(text)`` + EOS, every token trained.

Labels are the token ids on answer tokens and -100 elsewhere (everywhere with
``train_on_prompt``). In an answer turn, tokens after its first stop token (the
template's end-of-turn, e.g. the newline after ``<|im_end|>``) are not trained.
Sequences longer than ``max_length`` are cut at the end: an example whose answer is
shortened is counted as *cut*, one with no answer token left is *skipped* (and an
error is raised when nothing is left to train on).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ...conversations import SftExample
from ...errors import InvalidArgumentError

__all__ = [
    "EvalPrompt",
    "Truncation",
    "check_chat_template",
    "encode_sft",
    "eval_prompts",
    "stop_token_ids",
]

IGNORE = -100


@dataclass
class Truncation:
    """What ``max_length`` did to a set of examples."""

    examples: int = 0
    cut: int = 0
    skipped: int = 0
    skipped_rows: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        """The counts, for metrics.json."""
        return {"examples": self.examples, "cut": self.cut, "skipped": self.skipped}


@dataclass(frozen=True)
class EvalPrompt:
    """A held-out prompt to generate from, and the answer it should produce."""

    row: int
    prompt_ids: list[int]
    prompt_text: str
    reference: str


def stop_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """The tokens that end an answer: the tokenizer's EOS and the model's generation
    EOS ids (chat models often stop on an end-of-turn token)."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    for i in extra if isinstance(extra, list) else [extra]:
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    if not ids:
        raise InvalidArgumentError("the tokenizer has no end-of-sequence token")
    return ids


def check_chat_template(tokenizer: Any, examples: Sequence[SftExample], source: str) -> None:
    """Conversational data needs the tokenizer's chat template."""
    if any(ex.chat for ex in examples) and not getattr(tokenizer, "chat_template", None):
        raise InvalidArgumentError(
            f"{source}: conversational rows need a chat template, and this model's "
            "tokenizer has none (tokenizer_config.json / chat_template.jinja); give "
            "prompt/completion strings or text, or a model with a chat template"
        )


def _render(tokenizer: Any, messages: Sequence[tuple[str, str]], generation: bool) -> str:
    msgs = [{"role": r, "content": c} for r, c in messages]
    return str(
        tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation)
    )


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _chat_pieces(tokenizer: Any, ex: SftExample) -> list[tuple[str, bool]]:
    """The rendered conversation as ``(text, is_answer)`` pieces in order."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, (role, _) in enumerate(ex.messages):
        if role != "assistant" or i < ex.answer_from:
            continue
        before = _render(tokenizer, ex.messages[:i], True)
        upto = _render(tokenizer, ex.messages[: i + 1], False)
        if not before.startswith(done) or not upto.startswith(before):
            raise InvalidArgumentError(
                "the chat template renders earlier turns differently when later turns are "
                "added, so answer turns cannot be found; train on the whole text with "
                "--train-on-prompt, or give prompt/completion rows"
            )
        pieces += [(before[len(done) :], False), (upto[len(before) :], True)]
        done = upto
    rest = _render(tokenizer, ex.messages, False)
    if rest.startswith(done) and len(rest) > len(done):
        pieces.append((rest[len(done) :], False))
    return pieces


def _answer_labels(ids: list[int], stops: set[int]) -> list[int]:
    """Labels of one answer piece: trained up to and including its first stop token."""
    out = []
    stopped = False
    for t in ids:
        out.append(IGNORE if stopped else t)
        stopped = stopped or t in stops
    return out


def _sequence(
    tokenizer: Any, ex: SftExample, stops: set[int], eos: int
) -> tuple[list[int], list[int]]:
    """``(input_ids, answer_labels)`` of one example, before truncation."""
    if ex.chat:
        ids: list[int] = []
        labels: list[int] = []
        for text, is_answer in _chat_pieces(tokenizer, ex):
            piece = _ids(tokenizer, text, False)
            ids += piece
            labels += _answer_labels(piece, stops) if is_answer else [IGNORE] * len(piece)
        return ids, labels
    if ex.format == "text":
        ids = [*_ids(tokenizer, ex.text, True), eos]
        return ids, list(ids)
    prompt = _ids(tokenizer, ex.prompt, True)
    answer = _ids(tokenizer, ex.answer, False)
    if not answer or answer[-1] not in stops:
        answer.append(eos)
    return prompt + answer, [IGNORE] * len(prompt) + answer


def encode_sft(
    tokenizer: Any,
    examples: Sequence[SftExample],
    max_length: int,
    *,
    stops: Iterable[int],
    train_on_prompt: bool = False,
    source: str = "data",
) -> tuple[list[dict[str, list[int]]], list[int], Truncation]:
    """Token ids and labels of every example that keeps an answer token; returns
    ``(encoded, kept_rows, truncation)`` (``kept_rows``: indices into ``examples``)."""
    if max_length < 2:
        raise InvalidArgumentError(f"max_length must be at least 2, got {max_length}")
    check_chat_template(tokenizer, examples, source)
    stop_set = set(stops)
    eos = next(iter(stops))
    report = Truncation(examples=len(examples))
    encoded: list[dict[str, list[int]]] = []
    kept: list[int] = []
    for row, ex in enumerate(examples):
        ids, labels = _sequence(tokenizer, ex, stop_set, eos)
        trained = sum(t != IGNORE for t in labels)
        ids, labels = ids[:max_length], labels[:max_length]
        left = sum(t != IGNORE for t in labels)
        if left == 0:
            report.skipped += 1
            report.skipped_rows.append(row)
            continue
        report.cut += left < trained
        if train_on_prompt:
            labels = list(ids)
        encoded.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
        kept.append(row)
    if not encoded:
        raise InvalidArgumentError(
            f"{source}: every one of the {len(examples)} examples loses its whole answer "
            f"at --max-length {max_length}; raise --max-length"
        )
    return encoded, kept, report


def eval_prompts(
    tokenizer: Any, examples: Sequence[SftExample], max_length: int
) -> tuple[list[EvalPrompt], int]:
    """The held-out prompts to judge by generation (the last answer of each example is
    the reference) and how many were left out because the prompt alone reaches
    ``max_length`` tokens. Plain-text examples have no prompt."""
    out: list[EvalPrompt] = []
    too_long = 0
    for row, ex in enumerate(examples):
        ref = ex.reference()
        if ref is None:
            continue
        index, reference = ref
        if ex.chat:
            text = _render(tokenizer, ex.messages[:index], True)
            ids = _ids(tokenizer, text, False)
        else:
            text = ex.prompt
            ids = _ids(tokenizer, text, True)
        if len(ids) >= max_length:
            too_long += 1
            continue
        out.append(EvalPrompt(row, ids, text, reference))
    return out, too_long
