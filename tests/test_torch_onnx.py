"""ONNX export of a merged model: onnxruntime matches torch within 1e-4.

Also external data (weights in ``OUT.onnx.data``): forced on a small model, automatic on
a model over 2 GB, which is exported in a subprocess whose peak memory is measured.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402
from tiny_models import tiny_llama  # noqa: E402
from unilora_rs.cli import main  # noqa: E402
from unilora_rs.errors import InvalidArgumentError  # noqa: E402
from unilora_rs.torch import (  # noqa: E402
    UniLoRAConfig,
    UniLoRAModel,
    get_unilora_model,
)
from unilora_rs.torch.export import onnx as onnx_export  # noqa: E402
from unilora_rs.torch.export import onnx_files  # noqa: E402
from unilora_rs.torch.onnx_export import export_adapter_onnx, export_onnx  # noqa: E402


def _tiny_llama() -> torch.nn.Module:
    return tiny_llama(0).eval()


def test_export_merged_model_matches_torch(tmp_path: Path) -> None:
    model = get_unilora_model(
        _tiny_llama(),
        UniLoRAConfig(rank=4, vector_length=512, target_modules="all-linear", init_range=0.3),
    )
    merged = model.merge_and_unload()
    out = tmp_path / "model.onnx"
    report = export_onnx(merged, out)
    assert out.exists() and report.max_abs_diff <= 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary left behind
    # an independent check on yet another shape
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 64, (1, 23), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    (got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        expected = merged(input_ids=ids, attention_mask=mask).logits.numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_cli_export_onnx(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base_dir = tmp_path / "base"
    _tiny_llama().save_pretrained(base_dir)
    base = transformers.LlamaForCausalLM.from_pretrained(str(base_dir))
    model = get_unilora_model(base, UniLoRAConfig(rank=2, vector_length=300, init_range=0.3))
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    out = tmp_path / "merged.onnx"
    # the adapter records its local base folder, so --base may be left out
    assert model.adapter_config.base_model_name_or_path == str(base_dir)
    assert main(["export-onnx", str(adapter_dir), str(out)]) == 0
    assert "onnxruntime matches torch within" in capsys.readouterr().out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    (got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits.numpy()  # unmerged adapter
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)

    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(dict(cfg, base_model_name_or_path="someone/remote-model")))
    assert main(["export-onnx", str(adapter_dir), str(tmp_path / "x.onnx")]) == 1
    err = capsys.readouterr().err
    assert "give the base model folder with --base" in err and "someone/remote-model" in err
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(InvalidArgumentError, match="is an input"):
        from unilora_rs.torch.onnx_export import export_adapter_onnx

        export_adapter_onnx(adapter_dir, adapter_dir / "adapter_config.json", base=base_dir)


def _locations(path: Path) -> set[str]:
    """The external-data file names the graph refers to."""
    model = onnx.load(str(path), load_external_data=False)
    return {
        entry.value
        for init in model.graph.initializer
        for entry in init.external_data
        if entry.key == "location"
    }


def _adapter_pair(tmp_path: Path) -> tuple[Path, Path]:
    base_dir = tmp_path / "base"
    _tiny_llama().save_pretrained(base_dir)
    base = transformers.LlamaForCausalLM.from_pretrained(str(base_dir))
    model = get_unilora_model(base, UniLoRAConfig(rank=2, vector_length=300, init_range=0.3))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", base_dir


def _check_against_adapter(out: Path, adapter: Path, base: Path, seed: int, vocab: int) -> None:
    """onnxruntime on the written files against torch running the unmerged adapter."""
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    (got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    del session
    model = UniLoRAModel.from_pretrained(
        onnx_export.load_base_model(base, show_progress=False), adapter
    )
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits.numpy()
    keep = mask.numpy().astype(bool)
    np.testing.assert_allclose(got[keep], expected[keep], rtol=0, atol=1e-4)


def test_cli_external_data_on_a_small_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter, base = _adapter_pair(tmp_path)
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "merged.onnx"
    assert main(["export-onnx", str(adapter), str(out), "--external-data"]) == 0
    captured = capsys.readouterr()
    assert "merged.onnx.data (" in captured.out and "as external data)" in captured.out
    assert "writing" in captured.err and "checking the graph with onnxruntime" in captured.err
    assert sorted(p.name for p in outdir.iterdir()) == ["merged.onnx", "merged.onnx.data"]
    assert _locations(out) == {"merged.onnx.data"}  # the final name, relative to the graph
    _check_against_adapter(out, adapter, base, seed=5, vocab=64)

    # both files are replaced on a second export with --overwrite (refused without it);
    # --no-progress is silent on stderr
    before = out.read_bytes()
    again = ["export-onnx", str(adapter), str(out), "--external-data", "--no-progress"]
    assert main(again) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "output exists (pass overwrite=True or --overwrite" in err, err
    assert main([*again, "--overwrite"]) == 0
    assert capsys.readouterr().err == ""
    assert out.read_bytes() == before
    assert sorted(p.name for p in outdir.iterdir()) == ["merged.onnx", "merged.onnx.data"]

    # without the flag a small model stays one file
    single = outdir / "single.onnx"
    assert main(["export-onnx", str(adapter), str(single), "--no-progress"]) == 0
    assert "as external data" not in capsys.readouterr().out
    assert _locations(single) == set() and not (outdir / "single.onnx.data").exists()


def test_external_data_automatic_over_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a limit of 1 KB stands in for 2 GB: the same code path, on a small model
    monkeypatch.setattr(onnx_files, "SINGLE_FILE_LIMIT", 1024)
    lines: list[str] = []
    out = tmp_path / "auto.onnx"
    report = export_onnx(_tiny_llama(), out, progress=lines.append)
    assert report.data_path == tmp_path / "auto.onnx.data" and report.auto_external
    assert report.weight_bytes > 1024 and report.max_abs_diff <= 1e-4
    assert any("over the 2 GB single-file limit" in line for line in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auto.onnx", "auto.onnx.data"]
    with pytest.raises(InvalidArgumentError, match="over the 2 GB limit of a single ONNX file"):
        export_onnx(_tiny_llama(), tmp_path / "one.onnx", external_data=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auto.onnx", "auto.onnx.data"]


def test_external_data_refusals_keep_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter, base = _adapter_pair(tmp_path)
    # the data file beside OUT would overwrite an input
    target = base / "model.onnx"
    (base / "model.onnx.data").write_bytes(b"mine")
    with pytest.raises(InvalidArgumentError, match=r"model\.onnx\.data is an input"):
        export_adapter_onnx(adapter, target, base=base, external_data=True)
    assert (base / "model.onnx.data").read_bytes() == b"mine" and not target.exists()
    (base / "model.onnx.data").unlink()

    outdir = tmp_path / "out"
    (outdir / "m.onnx.data").mkdir(parents=True)  # the data name is taken by a folder
    with pytest.raises(IsADirectoryError, match="external-data path"):
        export_onnx(_tiny_llama(), outdir / "m.onnx", external_data=True)
    (outdir / "m.onnx.data").rmdir()

    # no room on the disk: said before writing anything
    usage = shutil.disk_usage(outdir)
    monkeypatch.setattr(onnx_files.shutil, "disk_usage", lambda _p: usage._replace(free=1000))
    with pytest.raises(OSError, match="not enough disk space") as info:
        export_onnx(_tiny_llama(), outdir / "m.onnx", external_data=True)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()

    # the disk fills up while writing: a clear error, nothing left behind
    def full_disk(model: object, path: Path, data_name: str | None, say: object) -> None:
        (path.parent / str(data_name)).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx_files, "save_graph", full_disk)
    assert main(["export-onnx", str(adapter), str(outdir / "m.onnx"), "--external-data"]) == 1
    assert list(outdir.iterdir()) == []


# A model over 2 GB: a 1-layer Llama with a 1.05M-token vocabulary, untied embeddings and
# lm_head of 1.08 GB each (fp32). Exported by the command line in a subprocess, whose peak
# resident memory is compared with the weights' size.
BIG_VOCAB = 1_050_000


def _big_llama(folder: Path) -> int:
    """Saves a random-init model over 2 GiB to ``folder``; returns its weight bytes."""
    cfg = transformers.LlamaConfig(
        vocab_size=BIG_VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):  # transformers' own init of 2 GB takes several seconds
        model = transformers.LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
    rotary = type(model.model.rotary_emb)(config=cfg)  # buffers computed, not random
    model.model.rotary_emb = rotary
    model.save_pretrained(folder)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    assert size > 2**31
    return size


@pytest.fixture
def big_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)  # 4+ GB: not kept for pytest's history


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def test_cli_export_over_2gb_writes_external_data(big_dir: Path) -> None:
    if shutil.disk_usage(big_dir).free < 6e9:
        pytest.skip("needs 6 GB of free disk (the base model and the export, 2.15 GB each)")
    if sys.platform != "linux" or _mem_available() < 6e9:
        pytest.skip("needs Linux (peak RSS from wait4) with 6 GB of available memory")
    base_dir = big_dir / "base"
    weight_bytes = _big_llama(base_dir)
    base = transformers.LlamaForCausalLM.from_pretrained(str(base_dir))
    model = get_unilora_model(
        base, UniLoRAConfig(rank=4, vector_length=256, target_modules="all-linear", init_range=0.3)
    )
    adapter = big_dir / "adapter"
    model.save_pretrained(adapter)
    del model, base
    gc.collect()

    outdir = big_dir / "out"
    outdir.mkdir()
    out = outdir / "big.onnx"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "unilora_rs", "export-onnx", str(adapter), str(out)]
    cmd += ["--base", str(base_dir)]
    with (big_dir / "stdout").open("w+") as so, (big_dir / "stderr").open("w+") as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own peak memory
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        so.seek(0)
        se.seek(0)
        stdout, stderr = so.read(), se.read()
    assert proc.returncode == 0, stderr
    assert "over the 2 GB single-file limit" in stdout
    assert "tensor" in stderr  # progress while the weights are written
    peak = usage.ru_maxrss * 1024  # Linux: KiB
    print(f"export peak RSS {peak / 1e9:.2f} GB for {weight_bytes / 1e9:.2f} GB of weights")
    # one copy of the weights plus the interpreter and libraries (about 0.8 GB) and the
    # reference logits; a second copy (the graph's, or onnxruntime's) would exceed this
    assert peak < 2 * weight_bytes
    assert sorted(p.name for p in outdir.iterdir()) == ["big.onnx", "big.onnx.data"]
    assert out.stat().st_size < 2**20 and (outdir / "big.onnx.data").stat().st_size >= 2**31
    assert _locations(out) == {"big.onnx.data"}
    _check_against_adapter(out, adapter, base_dir, seed=7, vocab=BIG_VOCAB)


@pytest.mark.parametrize("external", [False, True], ids=["embedded", "external-data"])
def test_a_full_disk_is_one_line_naming_the_output(tmp_path: Path, external: bool) -> None:
    from fault_helpers import cli_with_file_size_limit

    adapter, base = _adapter_pair(tmp_path)
    out = tmp_path / "x.onnx"
    argv = ["export-onnx", str(adapter), str(out), "--base", str(base), "--no-progress"]
    proc = cli_with_file_size_limit(20_000, *argv, *(["--external-data"] * external))
    assert proc.returncode == 1, proc.stdout
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "writing the ONNX files failed" in proc.stderr and str(out) in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]


def test_existing_outputs_and_a_users_data_file_are_kept_without_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """export-onnx replaced an existing OUT.onnx and a user's OUT.onnx.data silently."""
    adapter, _base = _adapter_pair(tmp_path)
    out = tmp_path / "m.onnx"
    out.write_bytes(b"mine")
    argv = ["export-onnx", str(adapter), str(out), "--no-progress"]
    assert main(argv) == 1
    assert "output exists" in capsys.readouterr().err and out.read_bytes() == b"mine"
    out.unlink()
    (tmp_path / "m.onnx.data").write_bytes(b"my data")
    assert main([*argv, "--external-data"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "m.onnx.data" in err and "output exists" in err
    assert (tmp_path / "m.onnx.data").read_bytes() == b"my data" and not out.exists()
    # an embedded export leaves the data file alone
    assert main(argv) == 0 and (tmp_path / "m.onnx.data").read_bytes() == b"my data"
    assert main([*argv, "--external-data", "--overwrite"]) == 0
    assert _locations(out) == {"m.onnx.data"}


def test_an_opset_torch_cannot_write_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--opset 5 reported opset 5 and wrote opset 18."""
    adapter, _base = _adapter_pair(tmp_path)
    out = tmp_path / "m.onnx"
    capsys.readouterr()
    assert main(["export-onnx", str(adapter), str(out), "--opset", "5", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "opset 5 cannot be written for this graph" in err, err
    assert f"torch.onnx writes opsets 18 to {onnx.defs.onnx_opset_version()}" in err, err
    assert not out.exists()
    # an opset beyond what onnx knows is refused before any model is loaded
    too_new = onnx.defs.onnx_opset_version() + 1
    argv = ["export-onnx", str(adapter), str(out), "--opset", str(too_new), "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"opset {too_new} is not supported" in err, err
    assert not out.exists()
    assert main(["export-onnx", str(adapter), str(out), "--opset", "19", "--no-progress"]) == 0
    assert "(opset 19)" in capsys.readouterr().out
    assert onnx.load(str(out)).opset_import[0].version == 19
