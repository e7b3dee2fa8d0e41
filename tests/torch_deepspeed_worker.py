"""One rank of the DeepSpeed tests (run with torchrun by tests/test_torch_deepspeed.py):
the model, data and steps of torch_fsdp_worker.py under ``deepspeed.initialize`` with
ZeRO stage 2 or 3 on the CPU (DS_ACCELERATOR=cpu, gloo). Writes OUT_DIR/zero<k>-rank<r>.pt
and, from rank 0, the adapter saved with save_pretrained (called on every rank).

Usage: torchrun --nproc_per_node 2 torch_deepspeed_worker.py OUT_DIR STAGE [STAGE ...]
"""

from __future__ import annotations

import os
import sys

import deepspeed
import torch
import torch.distributed as dist
import torch_fsdp_worker as common


def run(stage: int, out_dir: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = common.fresh_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=common.LR)
    per = common.GLOBAL_BATCH // world
    config = {
        "train_batch_size": common.GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": per,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    partitioned = hasattr(model.theta_d, "ds_id")
    losses = []
    for batch in common.batches():
        local = batch[rank * per : (rank + 1) * per]
        loss = engine(local, labels=local).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    adapter = os.path.join(out_dir, f"zero{stage}-adapter")
    model.save_pretrained(adapter, is_main_process=rank == 0)
    from safetensors.numpy import load_file

    dist.barrier()
    theta = torch.from_numpy(
        load_file(os.path.join(adapter, "adapter_model.safetensors"))["theta_d"]
    )
    torch.save(
        {"theta": theta, "losses": losses, "partitioned": partitioned},
        os.path.join(out_dir, f"zero{stage}-rank{rank}.pt"),
    )
    dist.barrier()


def main() -> None:
    out_dir, stages = sys.argv[1], [int(s) for s in sys.argv[2:]]
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        for stage in stages:
            run(stage, out_dir)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
