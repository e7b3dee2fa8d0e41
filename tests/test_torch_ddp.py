"""DistributedDataParallel with 2 CPU processes (gloo): theta_d stays identical on every rank."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from dist_helpers import run_ranks  # noqa: E402

WORKER = Path(__file__).resolve().parent / "torch_ddp_worker.py"


def test_ddp_keeps_theta_identical_across_ranks(tmp_path: Path) -> None:
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    run_ranks(WORKER, lambda rank, port: [str(rank), "2", port, str(tmp_path)], timeout=150)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert not torch.equal(r0["initial"], r1["initial"])  # ranks started differently
    assert torch.equal(r0["final"], r1["final"])  # DDP synchronised them exactly
    assert not torch.equal(r0["final"], r0["initial"])  # and training moved theta_d
