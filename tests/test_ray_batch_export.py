"""examples/ray_batch_export.py on a local Ray cluster (2 CPUs): every output equals the
single-process merge / export, and a worker killed mid-merge leaves no partial output
and its task is retried."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")

import unilora_rs as ur
from safetensors.numpy import save_file
from unilora_rs.adapter import (
    AdapterConfig,
    ModuleSpec,
    save_adapter,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "ray_batch_export.py"
# Large enough that one merge takes about a second on one thread (rank 128 over 24
# 1536 x 1536 float32 weights, 217 MB): time to see the staged output and kill its worker.
HIDDEN, LAYERS, SHARDS, RANK = 1536, 24, 4, 128
ADAPTERS = 3


def _base(folder: Path) -> list[ModuleSpec]:
    rng = np.random.default_rng(0)
    folder.mkdir()
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(LAYERS)]
    weight_map = {}
    per = LAYERS // SHARDS
    for k in range(SHARDS):
        shard = f"model-{k + 1:05d}-of-{SHARDS:05d}.safetensors"
        part = {
            n: (rng.standard_normal((HIDDEN, HIDDEN), dtype=np.float32) * 0.02)
            for n in names[k * per : (k + 1) * per]
        }
        save_file(part, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return [ModuleSpec(n.removesuffix(".weight"), HIDDEN, HIDDEN) for n in names]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("ray")
    modules = _base(tmp / "base")
    adapters = tmp / "adapters"
    ref = tmp / "reference"
    for i in range(ADAPTERS):
        cfg = AdapterConfig(seed=10 + i, vector_length=4096, rank=RANK, alpha=RANK, modules=modules)
        theta = np.random.default_rng(i).uniform(-0.05, 0.05, 4096).astype(np.float32)
        save_adapter(adapters / f"adapter{i}", cfg, theta)
        # The single-process outputs to compare with.
        ur.merge(tmp / "base", adapters / f"adapter{i}", ref / f"adapter{i}")
        ur.export_lora(adapters / f"adapter{i}", ref / f"adapter{i}-lora")
    return {"tmp": tmp, "base": tmp / "base", "adapters": adapters, "ref": ref}


def _holder(staging: Path) -> int | None:
    """The process with a file inside ``staging`` open (the Ray worker merging)."""
    prefix = str(staging)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd).startswith(prefix):
                    return int(proc.name)
        except OSError:
            continue
    return None


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}  # fmt: skip


def test_ray_outputs_equal_single_process_and_a_killed_task_is_retried(
    setup: dict[str, Path],
) -> None:
    out = setup["tmp"] / "out"
    out.mkdir()
    adapters = sorted(setup["adapters"].iterdir())
    env = dict(os.environ, PYTHONWARNINGS="ignore", RAY_DEDUP_LOGS="0")
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--base", str(setup["base"]), "--out", str(out),
         "--kind", "both", "--num-cpus", "2", "--retries", "3",
         "--adapters", *map(str, adapters)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    killed: tuple[int, Path, str] | None = None
    deadline = time.monotonic() + 240
    try:
        while proc.poll() is None and killed is None and time.monotonic() < deadline:
            for staging in out.glob(".adapter*.unilora-tmp-*"):
                target = out / staging.name[1:].split(".unilora-")[0]
                if target.name.endswith("-lora"):
                    continue  # exports are small; kill a merge
                pid = _holder(staging)
                if pid is None:
                    continue
                os.kill(pid, signal.SIGKILL)
                # Mid-way: the output is staged, not renamed into place.
                assert not target.exists()
                killed = (pid, target, staging.name)
                break
            time.sleep(0.002)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert killed is not None, "no merge was seen in progress: nothing was killed"
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    results = [r for r in lines if "summary" not in r]
    assert lines[-1]["summary"]["failed"] == 0
    assert len(results) == 2 * ADAPTERS
    assert not any(r["torch_imported"] for r in results)
    pid, target, staging_name = killed
    retried = next(r for r in results if r["out"] == str(target))
    assert retried["pid"] != pid  # a new worker ran the retry
    assert staging_name in retried["cleared"]  # and removed what the killed one staged
    assert not list(out.glob(".*"))  # nothing staged is left anywhere
    for i in range(ADAPTERS):
        for name in (f"adapter{i}", f"adapter{i}-lora"):
            got, want = _files(out / name), _files(setup["ref"] / name)
            assert got.keys() == want.keys() and got, name
            assert got == want, name  # byte for byte
