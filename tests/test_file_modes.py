"""Outputs get the process umask, as ``cp`` and ``open()`` give, not the 0600 of a
temporary file (the Python writers: adapters, GGUF, train's files, convert-peft)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from merge_helpers import write_adapter
from unilora_rs import _util
from unilora_rs.adapter import AdapterConfig, ModuleSpec, save_adapter

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")


@pytest.fixture(params=[0o022, 0o002, 0o077])
def mask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def modes(folder: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in sorted(folder.iterdir())}


def test_umask_is_read_without_changing_it(mask: int) -> None:
    assert _util.umask() == mask
    assert os.umask(mask) == mask


def test_write_atomic_and_save_adapter(tmp_path: Path, mask: int) -> None:
    _util.write_atomic(tmp_path / "f.bin", lambda tmp: tmp.write_bytes(b"x"))
    config = AdapterConfig(
        seed=0, vector_length=8, rank=2, alpha=2.0, modules=[ModuleSpec("m", 4, 4)]
    )
    save_adapter(tmp_path / "ad", config, np.zeros(8, np.float32))
    assert modes(tmp_path / "ad") == {
        "adapter_config.json": 0o666 & ~mask,
        "adapter_model.safetensors": 0o666 & ~mask,
    }
    assert modes(tmp_path)["f.bin"] == 0o666 & ~mask


def test_export_gguf(tmp_path: Path, mask: int) -> None:
    import json

    import unilora_rs as ur

    pytest.importorskip("gguf")
    base = tmp_path / "base"
    base.mkdir()
    config = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    (base / "config.json").write_text(json.dumps(config))
    mods = [ModuleSpec("model.layers.0.self_attn.v_proj", 32, 16)]
    write_adapter(
        tmp_path / "ad", mods, d=40, extra={"lm_head.weight": np.ones((8, 32), np.float32)}
    )
    ur.export_gguf(tmp_path / "ad", tmp_path / "o.gguf", base=base, saved_modules="separate")
    got = modes(tmp_path)
    assert got["o.gguf"] == got["o.saved_modules.safetensors"] == 0o666 & ~mask


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="process ids via /proc")
def test_a_killed_writers_temporary_goes_on_the_next_write(tmp_path: Path) -> None:
    """A Python writer killed mid-write left its hidden temporary beside the output for
    good (its name carried no process id). Temporaries are now named by the core with
    the writer's process id and the machine's tag; the next write of the same output
    removes those of ended processes and keeps a running process's."""
    import subprocess
    import sys

    seen: list[str] = []

    def write(tmp: Path) -> None:
        seen.append(tmp.name)
        tmp.write_bytes(b"x")

    target = tmp_path / "out.json"
    _util.write_atomic(target, write)
    (name,) = seen
    assert name.startswith(f".out.json.unilora-tmp-{os.getpid()}-"), name
    host = name.rsplit("-", 1)[1]
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead = int(done.stdout)  # a process that has ended
    stale = tmp_path / f".out.json.unilora-tmp-{dead}-0-{host}"
    live = tmp_path / f".out.json.unilora-tmp-{os.getpid()}-99999-{host}"
    other = tmp_path / f".other.json.unilora-tmp-{dead}-0-{host}"  # another output's
    for path in (stale, live, other):
        path.write_bytes(b"partial")
    _util.write_atomic(target, write)
    assert not stale.exists() and live.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "out.json"])
