"""``unilora train`` refuses bad options and data before training, each with one line
(in-process, on a tiny BERT with the packaged model's real tokenizer)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from unilora_rs.cli import main  # noqa: E402
from unilora_rs.datasets import FORMATS, packaged_model_dir  # noqa: E402

WORDS = ["good", "bad", "fine", "awful", "great", "poor", "nice", "dull"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-bert")
    tok = transformers.AutoTokenizer.from_pretrained(str(packaged_model_dir()))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    transformers.BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_data(path: Path, n: int = 40) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for i in range(n):
            w.writerow([f"a {WORDS[i % 8]} film, number {i}", "pos" if i % 2 else "neg"])
    return path


def train(tmp_path: Path, model: Path, *extra: str, out: Path | None = None) -> int:
    data = write_data(tmp_path / "d.csv")
    out = out or tmp_path / "out"
    fixed = ["--data", str(data), "--model", str(model), "--out", str(out), "--max-steps", "1"]
    return main(["train", *fixed, "--batch-size", "8", "--no-progress", *extra])


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("unilora: note:")]
    assert len(lines) == 1 and lines[0].startswith("unilora: error: "), err
    assert "internal error" not in err and "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--vector-length", "0"], "vector-length must be at least 1, got 0"),
        (["--threads", "-1"], "threads must be at least 1, got -1"),
        (["--threads", "0"], "threads must be at least 1, got 0"),
        (["--seed", str(2**64)], "seed must be an integer in [0, 2**64 - 1]"),
        (["--seed", "-1"], "seed must be an integer in [0, 2**64 - 1]"),
    ],
)
def test_bad_numbers_are_refused_first(
    tmp_path: Path, tiny_bert: Path, capsys: pytest.CaptureFixture[str], extra, message
) -> None:
    assert train(tmp_path, tiny_bert, *extra) == 1
    line = one_line_error(capsys)
    assert message in line
    assert not (tmp_path / "out").exists()


def test_an_output_that_cannot_be_created_is_refused_before_training(
    tmp_path: Path, tiny_bert: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert train(tmp_path, tiny_bert, out=blocker / "run") == 1
    line = one_line_error(capsys)
    assert "cannot be created" in line and "is not a folder" in line
    assert blocker.read_text() == "x"


def test_an_unwritable_output_is_refused_before_training(
    tmp_path: Path, tiny_bert: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert train(tmp_path, tiny_bert, out=locked / "run") == 1
    finally:
        locked.chmod(0o700)
    assert "not writable" in one_line_error(capsys)


def test_train_help_lists_every_data_format(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for suffix in FORMATS:
        assert suffix in text, suffix


def test_good_options_still_train(tmp_path: Path, tiny_bert: Path) -> None:
    assert train(tmp_path, tiny_bert, "--vector-length", "16", "--threads", "1") == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["vector_length"] == 16
    # every file gets the umask's mode, as open() gives (the adapter's files were 0600)
    from unilora_rs._util import file_mode

    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert modes == dict.fromkeys(modes, file_mode()) and len(modes) == 3


@pytest.mark.parametrize(
    ("steps", "message"),
    [("4", "the training loss became nan at step 2"), ("1", "the held-out loss became nan")],
)
def test_a_diverging_learning_rate_is_one_line(
    tmp_path: Path, tiny_bert: Path, capsys: pytest.CaptureFixture[str], steps: str, message: str
) -> None:
    """No torch warning before the error, and no adapter saved from a model that gives
    NaN (one step at lr 1e30 trained, evaluated NaN and saved)."""
    extra = ["--lr", "1e30", "--warmup-ratio", "0", "--max-steps", steps]
    assert train(tmp_path, tiny_bert, *extra) == 1
    assert message in one_line_error(capsys)
    assert not (tmp_path / "out" / "adapter_config.json").exists()


def test_a_model_folder_without_tokenizer_files_is_refused(
    tmp_path: Path, tiny_bert: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """transformers builds a tokenizer with only its special tokens from such a folder:
    every word became [UNK] and training "succeeded" at chance."""
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_bert / name, bare / name)
    assert train(tmp_path, bare) == 1
    line = one_line_error(capsys)
    assert "the tokenizer cannot encode the training text" in line
    assert "has none of the tokenizer files (tokenizer.json, vocab.txt" in line
    assert not (tmp_path / "out").exists()


def test_max_length_fits_a_roberta_style_position_offset(
    tmp_path: Path, tiny_bert: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """RoBERTa counts positions from padding_idx + 1: a 40-position model padding with
    id 0 takes 39 tokens (an input of 40 raised an internal IndexError)."""
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_bert))
    cfg = transformers.RobertaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
        pad_token_id=0,
    )
    folder = tmp_path / "roberta"
    transformers.RobertaModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    data = tmp_path / "long.csv"
    with data.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows([[" ".join(WORDS * 10) + f" {i}", i % 2] for i in range(20)])
    out = tmp_path / "out"
    argv = ["train", "--data", str(data), "--model", str(folder), "--out", str(out)]
    assert main([*argv, "--max-steps", "1", "--batch-size", "4", "--no-progress"]) == 0
    assert "more than the model's 39 positions; using 39" in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["max_length"] == 39


def test_a_full_disk_leaves_no_half_written_run(tmp_path: Path, tiny_bert: Path) -> None:
    """metrics.json was written in place after the adapter: a full disk left a run
    folder with an adapter and a truncated metrics.json."""
    from fault_helpers import cli_with_file_size_limit

    data = write_data(tmp_path / "d.csv")
    out = tmp_path / "out"
    argv = ["train", "--data", str(data), "--model", str(tiny_bert), "--out", str(out)]
    argv += ["--max-steps", "8", "--eval-steps", "1", "--batch-size", "4", "--no-progress"]
    proc = cli_with_file_size_limit(2048, *argv)  # the adapter's files fit, metrics do not
    assert proc.returncode == 1, proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("unilora: error")]
    assert len(errors) == 1 and "File too large (nothing was kept)" in errors[0], proc.stderr
    assert "metrics.json" in errors[0]
    assert not out.exists()
