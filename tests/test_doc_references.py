"""The documents README.md and docs/ name exist in the repository (TRAINING.md once cited
a DESIGN.md that is not part of it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

#: A document's name in prose or a link: ``SPEC.md``, ``docs/SPEC.md``, ``../README.md``.
_NAME = re.compile(r"(?<![\w./-])([\w./-]*\w\.md)\b")


def _prose(text: str) -> str:
    """``text`` without code: fenced blocks and inline code name files a command writes
    (``bench_gpu.md`` in an output folder), not documents of the repository."""
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", text)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_documents_exist(doc: Path) -> None:
    missing = sorted(
        {
            name
            for name in _NAME.findall(_prose(doc.read_text(encoding="utf-8")))
            if not (doc.parent / name).exists() and not (ROOT / name).exists()
        }
    )
    assert not missing, f"{doc.relative_to(ROOT)} names documents that do not exist: {missing}"


def test_the_check_finds_a_missing_document() -> None:
    text = "The paper's settings (DESIGN.md); see [the spec](SPEC.md#fingerprint), `out.md`."
    names = _NAME.findall(_prose(text))
    assert names == ["DESIGN.md", "SPEC.md"]
