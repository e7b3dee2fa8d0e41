"""`unilora inspect`, and the merge / export-lora command lines (success and errors)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import unilora_rs as ur
from merge_helpers import (
    llama_like_tensors,
    llama_modules,
    tree_hash,
    write_adapter,
    write_checkpoint,
)
from unilora_rs.cli import main


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    extra = {"lm_head.weight": np.zeros((64, 48), dtype=np.float32)}
    write_adapter(tmp_path / "ad", llama_modules(), rank=4, alpha=4.0, d=1000, seed=11, extra=extra)
    return tmp_path / "ad"


def test_inspect_api(adapter: Path) -> None:
    info = ur.inspect(adapter)
    assert (info.d, info.seed, info.rank, info.alpha) == (1000, 11, 4, 4.0)
    assert len(info.modules) == 21 and info.kinds == {"linear": 21}
    want_d = sum(4 * (m.in_features + m.out_features) for m in llama_modules())
    assert info.lora_parameters == want_d
    assert info.saved_parameters == 64 * 48
    assert info.fingerprint_ok and info.theta_finite
    disk = sum(p.stat().st_size for p in adapter.iterdir())
    assert info.size_on_disk == disk
    assert info.lora_bytes == 4 * want_d + 4 * 64 * 48


def test_inspect_cli_text_and_json(adapter: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(adapter)]) == 0
    out = capsys.readouterr().out
    assert "1,000" in out and "fingerprint" in out and " ok" in out
    assert "equivalent LoRA" in out
    assert main(["inspect", str(adapter), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["d"] == 1000 and data["fingerprint_ok"] is True and data["modules"] == 21


def test_inspect_reports_fingerprint_mismatch(
    adapter: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["vector_length"] = 999
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    # d no longer matches theta_d's length: a clear one-line error.
    assert main(["inspect", str(adapter)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("unilora: error:") and "theta_d" in err[0]
    cfg["vector_length"] = 1000
    cfg["seed"] = 12
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    assert main(["inspect", str(adapter)]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_merge_and_export_cli(
    tmp_path: Path, adapter: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = write_checkpoint(tmp_path / "base", llama_like_tensors("bf16"), shards=2)
    assert main(["merge", str(base), str(adapter), str(tmp_path / "m"), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("merged 21 tensors, replaced 1 into")
    assert captured.err == ""
    lora = ["export-lora", str(adapter), str(tmp_path / "lora")]
    assert main(lora) == 1  # modules_to_save: refused by default
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "modules_to_save (lm_head)" in err and "vLLM" in err
    assert not (tmp_path / "lora").exists()
    assert main([*lora, "--saved-modules", "keep"]) == 0
    assert "exported 21 LoRA modules + 1 saved tensor(s)" in capsys.readouterr().out
    assert main([*lora[:2], str(tmp_path / "sep"), "--saved-modules", "separate"]) == 0
    assert "+ 1 saved tensor(s) (in saved_modules.safetensors)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv_tail, message",
    [
        (["OUT"], "output exists"),
        (["BASE/inside"], "lies inside the base"),
        (["NEW", "--dtype", "f32"], None),
    ],
)
def test_merge_cli_errors(
    tmp_path: Path,
    adapter: Path,
    capsys: pytest.CaptureFixture[str],
    argv_tail: list[str],
    message: str | None,
) -> None:
    base = write_checkpoint(tmp_path / "base", llama_like_tensors("f32"), shards=2)
    (tmp_path / "OUT").mkdir()
    before = tree_hash(base)
    subst = {
        "OUT": str(tmp_path / "OUT"),
        "BASE/inside": str(base / "inside"),
        "NEW": str(tmp_path / "new"),
    }
    argv = [
        "merge",
        str(base),
        str(adapter),
        *[subst.get(a, a) for a in argv_tail],
        "--no-progress",
    ]
    code = main(argv)
    captured = capsys.readouterr()
    if message is None:
        assert code == 0
    else:
        assert code == 1
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("unilora: error:") and message in lines[0]
    assert tree_hash(base) == before


def test_cli_subprocess_shows_progress_and_fails_cleanly(tmp_path: Path, adapter: Path) -> None:
    base = write_checkpoint(tmp_path / "b.safetensors", llama_like_tensors("f16"))
    cmd = [
        sys.executable,
        "-m",
        "unilora_rs",
        "merge",
        str(base),
        str(adapter),
        str(tmp_path / "o.safetensors"),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "merge:" in r.stderr  # the progress bar is on by default
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    r = subprocess.run(
        [*cmd[:4], str(bad), str(adapter), str(tmp_path / "o2")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "o2").exists()


def test_closed_stdout_pipe_is_quiet(adapter: Path) -> None:
    """`unilora inspect --json | head -1`: no traceback, no error line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "unilora_rs", "inspect", str(adapter), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader goes away before the command writes
    with proc.stderr:
        err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "error" not in err, err
    assert proc.returncode == 141
