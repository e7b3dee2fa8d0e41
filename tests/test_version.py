"""One version everywhere: Cargo's workspace version is the extension's
(``CARGO_PKG_VERSION``), ``unilora_rs.__version__``, ``unilora --version`` and the
installed distribution's (the wheel maturin built)."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
import unilora_rs as ur
from unilora_rs import _core
from unilora_rs.cli import main

ROOT = Path(__file__).resolve().parent.parent
version = pytest.importorskip("packaging.version")


def _cargo_workspace_version() -> str:
    text = (ROOT / "Cargo.toml").read_text(encoding="utf-8")
    section = text.split("[workspace.package]", 1)[1].split("\n[", 1)[0]
    found = re.search(r'^version\s*=\s*"([^"]+)"', section, re.M)
    assert found, "Cargo.toml has no [workspace.package] version"
    return found.group(1)


def test_one_version(capsys: pytest.CaptureFixture[str]) -> None:
    cargo = _cargo_workspace_version()
    assert ur.__version__ == _core.__version__ == cargo
    # the wheel's version is Cargo's, in Python's spelling (0.2.0-rc.1 -> 0.2.0rc1)
    installed = importlib.metadata.version("unilora_rs")
    assert version.Version(installed) == version.Version(cargo)
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"unilora_rs {ur.__version__}\n"


def test_binding_crate_inherits_the_workspace_version() -> None:
    text = (ROOT / "Cargo.toml").read_text(encoding="utf-8")
    package = text.split("\n[package]", 1)[1].split("\n[", 1)[0]
    assert re.search(r"^version\.workspace\s*=\s*true", package, re.M), package
    assert 'dynamic = ["version"]' in (ROOT / "pyproject.toml").read_text(encoding="utf-8")
