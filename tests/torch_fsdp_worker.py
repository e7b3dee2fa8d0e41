"""One rank of the FSDP2 tests (run as a script by tests/test_torch_fsdp.py).

Trains a tiny Llama with a Uni-LoRA adapter under ``torch.distributed.fsdp.fully_shard``
(gloo, CPU): every decoder layer is one FSDP unit, the base model's root another, and
``theta_d`` sits alone in the outermost unit (the UniLoRAModel) with a float32 policy.
Each rank takes its half of the same global batches as the single-process reference in
the test. Writes OUT_DIR/<mode>-rank<k>.pt (final theta_d, losses, the reduce-scatter
calls of each step) and, from rank 0, the adapter saved with ``save_pretrained``.

Usage: torch_fsdp_worker.py RANK WORLD PORT OUT_DIR ADAPTER_DIR MODE [MODE ...]
  fp32   full-precision FSDP2
  bf16   MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) on the base units
  ckpt   bf16 + non-reentrant activation checkpointing of every decoder layer
  meta   every rank builds the model on the meta device (UniLoRAModel.from_pretrained
         with ADAPTER_DIR), shards it, and loads rank 0's full state dict by broadcast
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.distributed as dist
import transformers
from tiny_models import tiny_llama
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from unilora_rs.torch import UniLoRAConfig, UniLoRAModel, get_unilora_model

D_SMALL = 512
STEPS = 3
GLOBAL_BATCH = 4
SEQ = 10
LR = 1e-2
THETA_SEED = 5
DATA_SEED = 1


def config() -> UniLoRAConfig:
    return UniLoRAConfig(rank=4, vector_length=D_SMALL, target_modules="all-linear")


def batches() -> list[torch.Tensor]:
    """The global batches every run (sharded or not) trains on."""
    gen = torch.Generator().manual_seed(DATA_SEED)
    return [torch.randint(0, 64, (GLOBAL_BATCH, SEQ), generator=gen) for _ in range(STEPS)]


def fresh_model() -> UniLoRAModel:
    base = tiny_llama(0)
    torch.manual_seed(THETA_SEED)
    return get_unilora_model(base, config())


def shard(model: UniLoRAModel, bf16: bool) -> None:
    """FSDP2 units: each decoder layer, the base root (embeddings, norm, head), and the
    outermost unit holding only theta_d, kept in float32 whatever the base policy."""
    base_policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    base = model.base_model
    for layer in base.model.layers:
        fully_shard(layer, mp_policy=base_policy)
    fully_shard(base, mp_policy=base_policy)
    fully_shard(
        model,
        mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32),
    )


def meta_model(adapter_dir: str, rank: int) -> UniLoRAModel:
    """Meta-device init: nothing is allocated until to_empty; rank 0 also builds the real
    model on CPU (the base and the saved adapter) and broadcasts its full state dict."""
    full_sd = None
    if rank == 0:
        real = UniLoRAModel.from_pretrained(tiny_llama(0), adapter_dir, is_trainable=True)
        full_sd = real.state_dict()
    cfg = tiny_llama(0).config
    with torch.device("meta"):
        base = transformers.LlamaForCausalLM(cfg)
    model = UniLoRAModel.from_pretrained(base, adapter_dir, is_trainable=True)
    assert model.theta_d.device.type == "meta"
    shard(model, bf16=False)
    model.to_empty(device="cpu")
    # Non-persistent buffers (rotary frequencies) are not in any state dict: recompute.
    base.model.rotary_emb = type(base.model.rotary_emb)(cfg)
    set_model_state_dict(
        model,
        full_sd if full_sd is not None else {},
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
    )
    return model


def run(mode: str, rank: int, world: int, out_dir: str, adapter_dir: str) -> None:
    if mode == "meta":
        model = meta_model(adapter_dir, rank)
    else:
        model = fresh_model()
        if mode == "ckpt":
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        shard(model, bf16=mode in ("bf16", "ckpt"))
    theta_type = type(model.theta_d).__name__
    placements = str(getattr(model.theta_d, "placements", None))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)

    calls: list[list[int]] = []
    original = dist.reduce_scatter_single

    def counting(output: Any, input: Any, *args: Any, **kwargs: Any) -> Any:
        calls[-1].append(int(input.numel()))
        return original(output, input, *args, **kwargs)

    dist.reduce_scatter_single = counting  # type: ignore[assignment]
    losses = []
    per = GLOBAL_BATCH // world
    try:
        for batch in batches():
            calls.append([])
            local = batch[rank * per : (rank + 1) * per]
            loss = model(local, labels=local).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    finally:
        dist.reduce_scatter_single = original  # type: ignore[assignment]

    theta = model.theta_d.full_tensor().detach().clone()  # a collective
    adapter = os.path.join(out_dir, f"{mode}-adapter")
    # Every rank joins the gather inside save_pretrained; rank 0 writes.
    written = model.save_pretrained(adapter, is_main_process=rank == 0)
    assert (written is not None) == (rank == 0)
    restored = None
    if mode == "fp32":
        # Trainer's resume path on sharded ranks: each rank reads the file, keeps its shard.
        from unilora_rs.torch.training.hf_trainer import restore_adapter

        restore_adapter(model, adapter_dir)
        restored = model.theta_d.full_tensor().detach().clone()
    torch.save(
        {
            "theta": theta,
            "restored": restored,
            "losses": losses,
            "reduce_scatter_numel": calls,
            "theta_type": theta_type,
            "placements": placements,
            "checkpointing": bool(getattr(model.base_model.model, "gradient_checkpointing", False)),
        },
        os.path.join(out_dir, f"{mode}-rank{rank}.pt"),
    )
    dist.barrier()


def main() -> None:
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    out_dir, adapter_dir, modes = sys.argv[4], sys.argv[5], sys.argv[6:]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for mode in modes:
            run(mode, rank, world, out_dir, adapter_dir)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
