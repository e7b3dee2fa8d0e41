"""Reading training data (no torch): formats, labels, splits, the packaged real data."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from unilora_rs.datasets import (
    Example,
    LabelMap,
    classification_examples,
    read_records,
    sentiment_sentences,
    split_examples,
    text_examples,
)
from unilora_rs.errors import FormatError, InvalidArgumentError


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_formats_give_the_same_records(tmp_path: Path) -> None:
    want = [
        {"text": 'a, quoted "one"', "label": "pos"},
        {"text": "tab\tinside", "label": "neg"},
    ]
    csv_p = _write(tmp_path / "d.csv", 'text,label\n"a, quoted ""one""",pos\n"tab\tinside",neg\n')
    tsv_p = _write(
        tmp_path / "d.tsv", 'text\tlabel\n"a, quoted ""one"""\tpos\n"tab\tinside"\tneg\n'
    )
    jsonl_p = _write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in want) + "\n\n")
    json_p = _write(tmp_path / "d.json", json.dumps(want))
    for p in (csv_p, tsv_p, jsonl_p, json_p):
        assert read_records(p) == want, p.suffix


def test_utf8_bom_and_blank_lines(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_bytes("\ufefftext,label\n\nhé,1\n,\n".encode())
    assert read_records(p) == [{"text": "hé", "label": "1"}]


@pytest.mark.parametrize(
    ("name", "content", "error", "match"),
    [
        ("d.xlsx", "x", InvalidArgumentError, "unknown data format '.xlsx'"),
        ("d.csv", "", InvalidArgumentError, "empty"),
        ("d.csv", "text,label\na,b,c\n", FormatError, "line 2: 3 fields"),
        ("d.csv", "text,text\na,b\n", FormatError, "appears twice"),
        ("d.jsonl", '{"text": "a"}\n{oops\n', FormatError, "line 2: not valid JSON"),
        ("d.jsonl", '["a"]\n', FormatError, "expected a JSON object"),
        ("d.json", '{"text": "a"}', FormatError, "list of objects"),
    ],
)
def test_bad_files(tmp_path: Path, name: str, content: str, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        read_records(_write(tmp_path / name, content))


def test_missing_and_non_utf8(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_records(tmp_path / "none.csv")
    p = tmp_path / "latin.csv"
    p.write_bytes(b"text,label\ncaf\xe9,1\n")
    with pytest.raises(FormatError, match="not UTF-8"):
        read_records(p)
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(IsADirectoryError):
        read_records(tmp_path / "dir.csv")


def test_columns_and_labels() -> None:
    rows = [{"t": "x", "y": "b"}, {"t": "y", "y": "a"}, {"t": "z", "y": "b"}]
    ex, labels = classification_examples(rows, text_column="t", label_column="y")
    assert labels.names == ("a", "b")
    assert [e.label for e in ex] == [1, 0, 1]
    assert labels.id2label == {0: "a", 1: "b"}
    with pytest.raises(InvalidArgumentError, match=r"no text column 'text'.*columns are: t, y"):
        classification_examples(rows)
    with pytest.raises(InvalidArgumentError, match="no label column 'label'"):
        classification_examples(rows, text_column="t")
    with pytest.raises(InvalidArgumentError, match="at least two classes"):
        classification_examples([{"text": "a", "label": "x"}] * 3)
    with pytest.raises(InvalidArgumentError, match="no examples"):
        classification_examples([])
    with pytest.raises(InvalidArgumentError, match="row 2 has an empty text"):
        classification_examples([{"text": "a", "label": 1}, {"text": " ", "label": 0}])
    with pytest.raises(InvalidArgumentError, match="regression target"):
        classification_examples([{"text": "a", "label": "2.5"}, {"text": "b", "label": 1}])
    # evaluation labels must be known
    with pytest.raises(InvalidArgumentError, match="row 1 has label 'c'"):
        classification_examples(
            [{"t": "q", "y": "c"}], text_column="t", label_column="y", labels=labels
        )


def test_integer_labels_keep_their_ids() -> None:
    rows = [{"text": str(i), "label": v} for i, v in enumerate(["1", 0, 2.0, "2", True])]
    ex, labels = classification_examples(rows)
    assert [e.label for e in ex] == [1, 0, 2, 2, 1]
    assert labels.names == ("0", "1", "2")
    signed, lm = classification_examples([{"text": "a", "label": -1}, {"text": "b", "label": 1}])
    assert lm.names == ("-1", "1") and [e.label for e in signed] == [0, 1]
    # saved id2label round-trips (string keys as in JSON)
    back = LabelMap.from_id2label({"1": "1", "0": "0", "2": "2"})
    assert back.names == labels.names
    with pytest.raises(FormatError, match=r"0 \.\. K-1"):
        LabelMap.from_id2label({"0": "a", "2": "b"})


def test_text_examples() -> None:
    assert text_examples([{"body": " hi "}], text_column="body") == [Example("hi")]


def test_split_is_seeded_stratified_and_disjoint() -> None:
    ex = [Example(f"t{i}", i % 3 == 0) for i in range(300)]  # 100 of class 1
    train, held = split_examples(ex, 0.2, seed=5)
    again = split_examples(ex, 0.2, seed=5)
    assert (train, held) == again
    assert split_examples(ex, 0.2, seed=6)[1] != held
    assert len(held) == 60 and len(train) == 240
    assert Counter(e.label for e in held) == {0: 40, 1: 20}
    assert not {e.text for e in train} & {e.text for e in held}
    with pytest.raises(InvalidArgumentError, match=r"\(0, 1\)"):
        split_examples(ex, 1.0, 0)
    with pytest.raises(InvalidArgumentError, match="too few"):
        split_examples(ex[:1], 0.1, 0)


def test_packaged_sentiment_sentences() -> None:
    rows = sentiment_sentences()
    assert len(rows) == 10_568  # 10,605 sentences, 37 rated exactly 0 dropped
    counts = Counter(r["label"] for r in rows)
    assert counts == {"negative": 5326, "positive": 5242}
    assert rows[0]["text"].startswith("The Rock is destined to be the 21st Century's new")
    assert rows[0]["label"] == "positive"


def test_quoted_newlines_survive(tmp_path: Path) -> None:
    p = _write(tmp_path / "d.csv", 'text,label\n"line one\nline two",1\nb,0\n')
    assert read_records(p) == [
        {"text": "line one\nline two", "label": "1"},
        {"text": "b", "label": "0"},
    ]


def _reviews(n: int) -> list[str]:
    return [f"review number {i} is fine" for i in range(n)]


@pytest.mark.parametrize("quotes", [(3,), (3, 7)], ids=["one", "two"])
def test_tsv_reads_stray_quotes_as_text(tmp_path: Path, quotes: tuple[int, ...]) -> None:
    """A ``"`` in a TSV text is text: every line stays one example (the csv module
    joined the lines between two stray quotes into one text with the last label)."""
    texts = _reviews(12)
    for i in quotes:
        texts[i] = f'"so-called hero {i}' if i == quotes[0] else f'hero" {i}'
    lines = [f"{t}\t{'pos' if i % 2 else 'neg'}" for i, t in enumerate(texts)]
    rows = read_records(_write(tmp_path / "d.tsv", "text\tlabel\n" + "\n".join(lines) + "\n"))
    assert [r["text"] for r in rows] == texts
    assert [r["label"] for r in rows] == ["pos" if i % 2 else "neg" for i in range(12)]


def test_tsv_keeps_quoted_fields_written_by_the_csv_module(tmp_path: Path) -> None:
    import csv

    want = [["a\ttab", "1"], ['a "quote"', "0"], ["two\nlines", "1"], ["plain", "0"]]
    p = tmp_path / "d.tsv"
    with p.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, delimiter="\t")
        writer.writerow(["text", "label"])
        writer.writerows(want)
    assert [[r["text"], r["label"]] for r in read_records(p)] == want


def test_tsv_errors_name_the_line_and_give_tsv_advice(tmp_path: Path) -> None:
    p = _write(tmp_path / "d.tsv", 'text\tlabel\na\t1\n"b\t1\nc 1\nd\t0\n')
    with pytest.raises(FormatError, match=r"line 4: 1 fields.*separated by tabs") as err:
        read_records(p)
    assert "quote" not in str(err.value)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        # the quote never closes: the error names its line, not the end of the file
        ('a,1\n"so-called hero,0\nb,1\nc,0\n', r"line 3: a quote opened in this row is never"),
        # a quote closes cleanly many rows later: refused, not joined
        ('a,1\n"so-called hero,0\nb,1\nc,0\nthe end",1\nd,0\n', r"line 3: .*runs to line 6"),
        # a closing quote followed by text
        ('a,1\n"hero" of the day,0\nb,1\n', r"line 3: a closing quote is followed by text"),
    ],
)
def test_csv_stray_quotes_are_refused_with_their_line(
    tmp_path: Path, body: str, match: str
) -> None:
    with pytest.raises(FormatError, match=match) as err:
        read_records(_write(tmp_path / "d.csv", "text,label\n" + body))
    assert 'doubled ("")' in str(err.value)


def test_long_csv_fields_are_read(tmp_path: Path) -> None:
    long = "word " * 40_000  # 200,000 characters; the csv module stops at 131,072
    p = _write(tmp_path / "d.csv", f"text,label\n{long},1\nb,0\n")
    assert read_records(p)[0]["text"] == long
    p = _write(tmp_path / "d.tsv", f"text\tlabel\n{long}\t1\nb\t0\n")
    assert read_records(p)[0]["text"] == long


def test_labels_that_are_not_finite_numbers() -> None:
    """``nan``, ``inf`` and ``1e400`` written as labels are class names; a JSON number
    that is not finite is refused with its row (it raised OverflowError)."""
    rows = [{"text": t, "label": y} for t, y in [("a", "nan"), ("b", "inf"), ("c", "1e400")]]
    ex, labels = classification_examples(rows)
    assert labels.names == ("1e400", "inf", "nan") and [e.label for e in ex] == [2, 1, 0]
    for bad in (float("inf"), float("-inf"), float("nan")):
        with pytest.raises(InvalidArgumentError, match=r"row 2 has label .* class names or int"):
            classification_examples([{"text": "a", "label": 1}, {"text": "b", "label": bad}])


@pytest.mark.parametrize(
    ("value", "kind"), [(["a", "b"], "a JSON list"), ({"a": 1}, "a JSON object"), (True, "true")]
)
def test_texts_and_labels_that_are_json_structures_are_refused(value: object, kind: str) -> None:
    """A JSONL text that is a list or an object was silently turned into its repr."""
    good = {"text": "fine", "label": 0}
    with pytest.raises(InvalidArgumentError, match=f"row 2 holds {kind} in column 'text'"):
        classification_examples([good, {"text": value, "label": 1}])
    with pytest.raises(InvalidArgumentError, match=f"row 2 holds {kind} in column 'text'"):
        text_examples([good, {"text": value}])
    if not isinstance(value, bool):
        with pytest.raises(InvalidArgumentError, match=f"row 2 holds {kind} in column 'label'"):
            classification_examples([good, {"text": "b", "label": value}])


def test_split_names_one_example_per_class() -> None:
    ex = [Example(f"t{i}", i) for i in range(20)]
    with pytest.raises(InvalidArgumentError, match="every one of the 20 classes has a single"):
        split_examples(ex, 0.1, 0)
    ex = [Example(f"t{i}", i % 5) for i in range(20)]  # 4 per class: 0.1 of 4 rounds to 0
    with pytest.raises(InvalidArgumentError, match=r"at most 4 per class.* rounds to no example"):
        split_examples(ex, 0.1, 0)
