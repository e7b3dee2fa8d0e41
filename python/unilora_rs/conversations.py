"""Instruction data for supervised fine-tuning, in the formats TRL's ``SFTTrainer`` reads.

Each row of a file is one of:

* **prompt / completion**: two strings (the completion is the answer), or two lists of
  ``{"role", "content"}`` messages (conversational: rendered with the chat template,
  the completion's assistant turns are the answer);
* **messages**: a list of ``{"role", "content"}`` messages rendered with the tokenizer's
  chat template; every assistant turn is an answer;
* **text**: plain text, trained on every token.

All rows of a file share one format. :func:`sft_examples` checks them (known roles,
string contents, non-empty answers) and returns :class:`SftExample` objects; the torch
side (:mod:`unilora_rs.torch.training.sft`) tokenizes them. Torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import InvalidArgumentError

__all__ = ["ROLES", "SftColumns", "SftExample", "sft_examples"]

#: Message roles a row may use (the roles chat templates know).
ROLES = ("system", "user", "assistant", "tool")

#: The three formats, as named in messages.
PROMPT_COMPLETION = "prompt/completion"
MESSAGES = "messages"
TEXT = "text"


@dataclass(frozen=True)
class SftColumns:
    """The column names of each format."""

    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"
    text: str = "text"


@dataclass(frozen=True)
class SftExample:
    """One example. ``messages`` (role, content) for conversational rows, where turns from
    index ``answer_from`` on that are the assistant's are answers; else ``prompt`` and
    ``answer`` strings; for plain text only ``text``."""

    format: str
    messages: tuple[tuple[str, str], ...] = ()
    answer_from: int = 0
    prompt: str = ""
    answer: str = ""
    text: str = ""

    @property
    def chat(self) -> bool:
        """True when the example is rendered with the chat template."""
        return bool(self.messages)

    def reference(self) -> tuple[int, str] | None:
        """``(index, content)`` of the last answer turn of a conversational example, or
        ``(-1, answer)`` for a prompt/completion one; ``None`` for plain text."""
        if self.chat:
            for i in range(len(self.messages) - 1, self.answer_from - 1, -1):
                if self.messages[i][0] == "assistant":
                    return i, self.messages[i][1]
            return None
        if self.format == TEXT:
            return None
        return -1, self.answer


def _format_of(row: Mapping[str, Any], cols: SftColumns) -> str | None:
    if row.get(cols.messages) is not None:
        return MESSAGES
    if cols.prompt in row and cols.completion in row:
        return PROMPT_COMPLETION
    if cols.text in row:
        return TEXT
    return None


def _detect(rows: Sequence[Mapping[str, Any]], cols: SftColumns, source: str) -> str:
    """The one format of ``rows``; a row of none, or rows of two formats, are errors."""
    first: dict[str, int] = {}
    for i, row in enumerate(rows):
        fmt = _format_of(row, cols)
        if fmt is None:
            available = ", ".join(sorted(row)) or "none"
            raise InvalidArgumentError(
                f"{source}: row {i + 1} has none of the columns {cols.prompt!r} + "
                f"{cols.completion!r}, {cols.messages!r} or {cols.text!r} (it has: "
                f"{available}); choose them with --prompt-column, --completion-column, "
                "--messages-column or --text-column"
            )
        first.setdefault(fmt, i + 1)
    if len(first) > 1:
        kinds = ", ".join(f"{fmt} (first in row {row})" for fmt, row in first.items())
        raise InvalidArgumentError(
            f"{source}: the rows mix formats: {kinds}; use one format per file"
        )
    return next(iter(first))


def _string(value: Any, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{where}: {what} must be a string, got {type(value).__name__}")
    return value


def _messages(value: Any, where: str) -> list[tuple[str, str]]:
    if isinstance(value, str):
        raise InvalidArgumentError(
            f"{where}: messages must be a list of {{role, content}} objects, got a string "
            "(CSV/TSV cells cannot hold them: write JSONL)"
        )
    if not isinstance(value, list) or not value:
        raise InvalidArgumentError(f"{where}: messages must be a non-empty list")
    out = []
    for k, m in enumerate(value, start=1):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise InvalidArgumentError(
                f"{where}: message {k} must be an object with 'role' and 'content'"
            )
        role = m["role"]
        if role not in ROLES:
            raise InvalidArgumentError(
                f"{where}: message {k} has the unknown role {role!r}; roles are {', '.join(ROLES)}"
            )
        out.append((role, _string(m["content"], where, f"message {k}'s content")))
    return out


def _check_answers(messages: Sequence[tuple[str, str]], start: int, where: str) -> None:
    answers = [(k, c) for k, (r, c) in enumerate(messages) if r == "assistant" and k >= start]
    if not answers:
        raise InvalidArgumentError(f"{where}: no assistant message to learn from")
    for k, content in answers:
        if not content.strip():
            raise InvalidArgumentError(f"{where}: empty answer (message {k + 1})")


def _prompt_completion(row: Mapping[str, Any], cols: SftColumns, where: str) -> SftExample:
    prompt, completion = row[cols.prompt], row[cols.completion]
    if isinstance(prompt, list) or isinstance(completion, list):
        msgs = _messages(prompt, f"{where} ({cols.prompt})")
        answer = _messages(completion, f"{where} ({cols.completion})")
        _check_answers(answer, 0, f"{where} ({cols.completion})")
        return SftExample(PROMPT_COMPLETION, tuple(msgs + answer), answer_from=len(msgs))
    p = _string(prompt, where, cols.prompt)
    c = _string(completion, where, cols.completion)
    if not p.strip():
        raise InvalidArgumentError(f"{where}: empty prompt in column {cols.prompt!r}")
    if not c.strip():
        raise InvalidArgumentError(f"{where}: empty answer in column {cols.completion!r}")
    return SftExample(PROMPT_COMPLETION, prompt=p, answer=c)


def _one(row: Mapping[str, Any], fmt: str, cols: SftColumns, where: str) -> SftExample:
    if fmt == MESSAGES:
        msgs = _messages(row[cols.messages], where)
        _check_answers(msgs, 0, where)
        return SftExample(MESSAGES, tuple(msgs))
    if fmt == PROMPT_COMPLETION:
        return _prompt_completion(row, cols, where)
    text = _string(row[cols.text], where, cols.text)
    if not text.strip():
        raise InvalidArgumentError(f"{where}: empty text in column {cols.text!r}")
    return SftExample(TEXT, text=text)


def sft_examples(
    rows: Sequence[Mapping[str, Any]],
    *,
    columns: SftColumns | None = None,
    source: str = "data",
) -> list[SftExample]:
    """The checked examples of ``rows`` (one format for all rows)."""
    if not rows:
        raise InvalidArgumentError(f"{source}: no examples (the file holds no data rows)")
    cols = columns or SftColumns()
    fmt = _detect(rows, cols, source)
    return [_one(row, fmt, cols, f"{source}: row {i + 1}") for i, row in enumerate(rows)]
