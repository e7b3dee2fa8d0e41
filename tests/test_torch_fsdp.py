"""FSDP2 (``fully_shard``) with 2 CPU processes (gloo) against a single-process run over
the same global batches: theta_d, the losses and the saved adapters agree."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import torch_fsdp_worker as worker  # noqa: E402
from dist_helpers import run_ranks  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

WORKER = Path(__file__).resolve().parent / "torch_fsdp_worker.py"
MODES = ["fp32", "bf16", "ckpt", "meta"]


def _reference(bf16: bool, out: Path) -> dict[str, object]:
    """One process, the whole global batch per step."""
    model = worker.fresh_model()
    if bf16:
        # What FSDP's param_dtype does: the base parameters in bf16 for compute, buffers
        # (rotary frequencies) untouched; theta_d stays float32.
        for p in model.base_model.parameters():
            p.data = p.data.to(torch.bfloat16)
        assert model.theta_d.dtype == torch.float32
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=worker.LR)
    losses = []
    for batch in worker.batches():
        loss = model(batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.save_pretrained(out)
    return {"theta": model.theta_d.detach().clone(), "losses": losses}


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("fsdp")
    initial = tmp / "initial-adapter"
    worker.fresh_model().save_pretrained(initial)  # what the meta-device run loads
    run_ranks(WORKER, lambda rank, port: [str(rank), "2", port, str(tmp), str(initial), *MODES])
    return tmp


def _rank(tmp: Path, mode: str, rank: int) -> dict[str, object]:
    return torch.load(tmp / f"{mode}-rank{rank}.pt")


@pytest.mark.parametrize("mode", MODES)
def test_fsdp2_matches_single_process(fsdp_run: Path, mode: str, tmp_path: Path) -> None:
    bf16 = mode in ("bf16", "ckpt")
    ref = _reference(bf16, tmp_path / "ref-adapter")
    r0, r1 = _rank(fsdp_run, mode, 0), _rank(fsdp_run, mode, 1)
    # theta_d is a DTensor sharded over the 2 ranks, in the root unit.
    assert r0["theta_type"] == "DTensor" and r0["placements"] == "(Shard(dim=0),)"
    assert r0["checkpointing"] is (mode == "ckpt")
    assert torch.equal(r0["theta"], r1["theta"])
    assert not torch.equal(r0["theta"], worker.fresh_model().theta_d.detach())
    torch.testing.assert_close(r0["theta"], ref["theta"], rtol=0, atol=1e-6)
    # Each rank's loss is the mean over its half (equal token counts): their mean is the
    # global loss.
    global_losses = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"], strict=True)]
    np.testing.assert_allclose(global_losses, ref["losses"], rtol=0, atol=1e-6)
    # One reduce-scatter per step, of theta_d's d values: the frozen base sends nothing
    # back, and theta_d's gradient is reduced once even with checkpointing.
    for rank_out in (r0, r1):
        assert rank_out["reduce_scatter_numel"] == [[worker.D_SMALL]] * worker.STEPS
    # save_pretrained on every rank (rank 0 writes) equals the single-process adapter.
    saved = fsdp_run / f"{mode}-adapter"
    ref_dir = tmp_path / "ref-adapter"
    assert json.loads((saved / "adapter_config.json").read_text()) == json.loads(
        (ref_dir / "adapter_config.json").read_text()
    )
    got = load_file(saved / "adapter_model.safetensors")
    want = load_file(ref_dir / "adapter_model.safetensors")
    assert got.keys() == want.keys() == {"theta_d"}
    np.testing.assert_allclose(got["theta_d"], want["theta_d"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got["theta_d"], r0["theta"].numpy())


def test_restore_adapter_into_sharded_theta(fsdp_run: Path) -> None:
    initial = load_file(fsdp_run / "initial-adapter" / "adapter_model.safetensors")["theta_d"]
    for rank in (0, 1):
        restored = _rank(fsdp_run, "fp32", rank)["restored"]
        np.testing.assert_array_equal(restored.numpy(), initial)
