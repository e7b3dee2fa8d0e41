"""One rank of the DDP test (run as a script by tests/test_torch_ddp.py): trains a tiny
Llama with a Uni-LoRA adapter under DistributedDataParallel (gloo, CPU) and writes its
final theta_d to OUT_DIR/rank<k>.pt."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from tiny_models import tiny_llama
from torch.nn.parallel import DistributedDataParallel as DDP
from unilora_rs.torch import UniLoRAConfig, get_unilora_model


def main() -> None:
    rank, world, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    # Different initial theta_d per rank on purpose: DDP must broadcast rank 0's.
    base = tiny_llama(0)
    torch.manual_seed(100 + rank)
    model = get_unilora_model(
        base, UniLoRAConfig(rank=4, vector_length=512, target_modules="all-linear")
    )
    initial = model.theta_d.detach().clone()
    ddp = DDP(model)
    opt = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank sees different data
    for _ in range(3):
        batch = torch.randint(0, 64, (2, 10), generator=gen)
        ddp(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    torch.save(
        {"initial": initial, "final": model.theta_d.detach().clone()},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
