"""The runnable examples run to completion and check their own results."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_end_to_end_example(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "end_to_end.py"),
            "--steps",
            "30",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("OK")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "merged" / "model.safetensors").exists()
    assert (tmp_path / "lora" / "adapter_model.safetensors").exists()
