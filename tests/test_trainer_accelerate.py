"""``accelerate launch`` + ``transformers.Trainer`` (examples/trainer_accelerate.py) with
2 CPU processes against one process over the same global batches, and resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from dist_helpers import free_port  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from unilora_rs.errors import MismatchError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "trainer_accelerate.py"
DDP_CONFIG = ROOT / "examples" / "accelerate" / "ddp.yaml"
ZERO3_CONFIG = ROOT / "examples" / "accelerate" / "deepspeed_zero3.yaml"
# DS_ACCELERATOR=cpu: DeepSpeed on the CPU (ignored by the other runs); ninja on PATH for
# DeepSpeed's CPU communication op.
ENV = dict(
    os.environ,
    OMP_NUM_THREADS="1",
    PYTHONWARNINGS="ignore",
    DS_ACCELERATOR="cpu",
    PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
)


def _run(cmd: list[str], timeout: int = 300) -> str:
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def _one_process(out: Path, *extra: str) -> dict[str, object]:
    _run([sys.executable, str(EXAMPLE), "--out", str(out), "--record", f"{out}.json", *extra])
    return json.loads(Path(f"{out}.json").read_text())


def _two_processes(out: Path, *extra: str, config: Path = DDP_CONFIG) -> dict[str, object] | None:
    accelerate = Path(sys.executable).with_name("accelerate")
    _run(
        [
            str(accelerate), "launch", "--config_file", str(config),
            "--main_process_port", str(free_port()),
            str(EXAMPLE), "--out", str(out), "--per-device-batch", "2",
            "--record", f"{out}.json", *extra,
        ]
    )  # fmt: skip
    record = Path(f"{out}.json")
    return json.loads(record.read_text()) if record.exists() else None


def _theta(adapter: Path) -> np.ndarray:
    return load_file(adapter / "adapter_model.safetensors")["theta_d"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("trainer")
    # One process: 4 examples x 2 accumulation steps = the global batch of 8.
    _one_process(tmp / "single")
    # Two processes: 2 examples x 2 processes x 2 accumulation steps.
    _two_processes(tmp / "ddp")
    # Two processes stopped after step 3 (its checkpoint written), then resumed.
    _two_processes(tmp / "resumed", "--stop-after", "3")
    _two_processes(tmp / "resumed", "--resume", "last")
    return {name: tmp / name for name in ("single", "ddp", "resumed")}


def test_two_processes_equal_one_process(runs: dict[str, Path]) -> None:
    single = json.loads(Path(f"{runs['single']}.json").read_text())
    ddp = json.loads(Path(f"{runs['ddp']}.json").read_text())
    assert single["world_size"] == 1 and ddp["world_size"] == 2
    assert ddp["distributed_type"] == "DistributedType.MULTI_CPU"
    # Trainer found the labels from the base model's forward (no label_names given).
    assert single["label_names"] == ddp["label_names"] == ["labels"]
    assert list(ddp["losses"]) == [str(s) for s in range(1, 7)]
    np.testing.assert_allclose(
        list(ddp["losses"].values()), list(single["losses"].values()), rtol=0, atol=1e-6
    )
    t1, t2 = _theta(runs["single"] / "adapter"), _theta(runs["ddp"] / "adapter")
    initial = _initial_theta()
    assert np.abs(t1 - initial).max() > 1e-3  # training moved theta_d
    np.testing.assert_allclose(t2, t1, rtol=0, atol=1e-6)
    cfg1 = json.loads((runs["single"] / "adapter" / "adapter_config.json").read_text())
    cfg2 = json.loads((runs["ddp"] / "adapter" / "adapter_config.json").read_text())
    assert cfg1 == cfg2


def _initial_theta() -> np.ndarray:
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        import trainer_accelerate as ex
    finally:
        sys.path.pop(0)
    from unilora_rs.torch import UniLoRAConfig, get_unilora_model

    base = ex.tiny_llama(0)
    torch.manual_seed(1)
    model = get_unilora_model(
        base, UniLoRAConfig(rank=4, vector_length=4096, target_modules="all-linear")
    )
    return model.theta_d.detach().numpy().copy()


def test_checkpoints_hold_the_adapter_not_the_base(runs: dict[str, Path]) -> None:
    for ckpt in ("checkpoint-3", "checkpoint-6"):
        folder = runs["ddp"] / ckpt
        names = {p.name for p in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt",
                "scheduler.pt", "trainer_state.json"} <= names  # fmt: skip
        assert "model.safetensors" not in names and "pytorch_model.bin" not in names
        assert load_file(folder / "adapter_model.safetensors").keys() == {"theta_d"}
    # The checkpoint at step 6 holds the final adapter.
    np.testing.assert_array_equal(
        _theta(runs["ddp"] / "checkpoint-6"), _theta(runs["ddp"] / "adapter")
    )


def test_resume_gives_the_uninterrupted_loss_curve(runs: dict[str, Path]) -> None:
    ddp = json.loads(Path(f"{runs['ddp']}.json").read_text())
    resumed = json.loads(Path(f"{runs['resumed']}.json").read_text())
    assert resumed["global_step"] == 6
    # The resumed process trained steps 4..6 only (theta_d, Adam's moments, the scheduler,
    # the RNG and the data position restored): the same losses, bit for bit.
    assert resumed["steps_run"] == [4, 5, 6] and ddp["steps_run"] == [1, 2, 3, 4, 5, 6]
    assert resumed["losses"] == ddp["losses"]
    np.testing.assert_array_equal(
        _theta(runs["resumed"] / "adapter"), _theta(runs["ddp"] / "adapter")
    )


def test_resume_refuses_an_adapter_of_another_projection(
    tmp_path: Path, runs: dict[str, Path]
) -> None:
    from unilora_rs.torch import UniLoRAConfig, get_unilora_model
    from unilora_rs.torch.training.hf_trainer import restore_adapter

    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        import trainer_accelerate as ex
    finally:
        sys.path.pop(0)
    other = get_unilora_model(
        ex.tiny_llama(0),
        UniLoRAConfig(rank=4, vector_length=4096, seed=7, target_modules="all-linear"),
    )
    before = other.theta_d.detach().clone()
    with pytest.raises(MismatchError, match="fingerprint"):
        restore_adapter(other, runs["ddp"] / "checkpoint-3")
    assert torch.equal(other.theta_d.detach(), before)  # nothing was loaded
    same = get_unilora_model(
        ex.tiny_llama(0), UniLoRAConfig(rank=4, vector_length=4096, target_modules="all-linear")
    )
    restore_adapter(same, runs["ddp"] / "checkpoint-3")
    np.testing.assert_array_equal(
        same.theta_d.detach().numpy(), _theta(runs["ddp"] / "checkpoint-3")
    )


def test_deepspeed_zero3_trainer_and_resume(runs: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    out = tmp_path / "zero3"
    _two_processes(out, "--stop-after", "3", config=ZERO3_CONFIG)
    zero3 = _two_processes(out, "--resume", "last", config=ZERO3_CONFIG)
    assert zero3 is not None
    single = json.loads(Path(f"{runs['single']}.json").read_text())
    assert zero3["distributed_type"] == "DistributedType.DEEPSPEED"
    assert zero3["steps_run"] == [4, 5, 6]
    np.testing.assert_allclose(
        list(zero3["losses"].values()), list(single["losses"].values()), rtol=0, atol=1e-6
    )
    np.testing.assert_allclose(
        _theta(out / "adapter"), _theta(runs["single"] / "adapter"), rtol=0, atol=1e-6
    )
    assert (out / "checkpoint-3" / "adapter_model.safetensors").is_file()
