"""Generated checkpoints, adapters and an independent numpy reference merge for the
merge / export tests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from unilora_rs import reconstruct
from unilora_rs.adapter import AdapterConfig, ModuleSpec, save_adapter

TORCH_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}

HIDDEN, INTER, LAYERS = 48, 80, 3
LINEARS = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN // 2),
    "self_attn.v_proj": (HIDDEN, HIDDEN // 2),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (HIDDEN, INTER),
    "mlp.up_proj": (HIDDEN, INTER),
    "mlp.down_proj": (INTER, HIDDEN),
}


def llama_like_tensors(dtype: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A Llama-shaped state dict (weights [out, in]), in layer order."""
    g = torch.Generator().manual_seed(seed)
    t = TORCH_DTYPES[dtype]

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.05).to(t)

    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rnd(64, HIDDEN)}
    for layer in range(LAYERS):
        for name, (fin, fout) in LINEARS.items():
            sd[f"model.layers.{layer}.{name}.weight"] = rnd(fout, fin)
        sd[f"model.layers.{layer}.input_layernorm.weight"] = rnd(HIDDEN)
    sd["model.norm.weight"] = rnd(HIDDEN)
    sd["lm_head.weight"] = rnd(64, HIDDEN)
    sd["model.position_ids"] = torch.arange(16, dtype=torch.int64)
    return sd


def llama_modules() -> list[ModuleSpec]:
    return [
        ModuleSpec(f"model.layers.{layer}.{name}", fin, fout)
        for layer in range(LAYERS)
        for name, (fin, fout) in LINEARS.items()
    ]


def write_checkpoint(path: Path, sd: dict[str, torch.Tensor], shards: int = 1) -> Path:
    """A single file (``shards == 1``, ``path`` is the file) or a model folder with
    ``shards`` files, ``model.safetensors.index.json`` and config/tokenizer files."""
    meta = {"format": "pt", "producer": "unilora_rs-tests"}
    if shards == 1:
        save_file(sd, str(path), metadata=meta)
        return path
    path.mkdir(parents=True)
    names = list(sd)
    per = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    total = 0
    for k in range(shards):
        shard = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: sd[n] for n in names[k * per : (k + 1) * per]}
        save_file(part, str(path / shard), metadata=meta)
        for n, v in part.items():
            weight_map[n] = shard
            total += v.numel() * v.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": HIDDEN}))
    (path / "tokenizer.json").write_text('{"version": "1.0"}')
    (path / "generation_config.json").write_text("{}")
    return path


def write_adapter(
    path: Path,
    modules: list[ModuleSpec],
    *,
    rank: int = 4,
    alpha: float = 8.0,
    d: int = 512,
    seed: int = 7,
    extra: dict[str, np.ndarray] | None = None,
    projection: str = "sparse",
) -> tuple[AdapterConfig, np.ndarray]:
    config = AdapterConfig(
        projection=projection,
        seed=seed,
        vector_length=d,
        rank=rank,
        alpha=alpha,
        modules=modules,
        modules_to_save=sorted({n.rsplit(".", 1)[0] for n in (extra or {})}),
    )
    theta = np.random.default_rng(seed).uniform(-0.5, 0.5, d).astype(np.float32)
    save_adapter(path, config, theta, extra)
    return config, theta


def lora_factors(
    config: AdapterConfig, theta: np.ndarray
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    mats = reconstruct(theta, config.seed, config.matrix_shapes())
    return {m.name: (mats[f"{m.name}.lora_B"], mats[f"{m.name}.lora_A"]) for m in config.modules}


def reference_delta(b: np.ndarray, a: np.ndarray, scaling: float) -> np.ndarray:
    """``s * (B @ A)`` in float32 with the specified operation order: the sum over k
    runs from 0 to r-1, every product and sum rounded to float32 (numpy elementwise
    operations, no BLAS, no fused multiply-add)."""
    acc = np.zeros((b.shape[0], a.shape[1]), dtype=np.float32)
    for k in range(b.shape[1]):
        acc += b[:, k : k + 1] * a[k : k + 1, :]
    return np.float32(scaling) * acc


def reference_merge(
    w32: np.ndarray, b: np.ndarray, a: np.ndarray, scaling: float, kind: str
) -> np.ndarray:
    delta = reference_delta(b, a, scaling)
    return w32 + (delta.T if kind == "conv1d" else delta)


def raw_tensors(path: Path) -> tuple[bytes, dict[str, tuple[str, list[int], bytes]]]:
    """(header bytes, name -> (dtype, shape, raw data bytes)), parsed with the stdlib."""
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        b0, b1 = entry["data_offsets"]
        out[name] = (entry["dtype"], entry["shape"], blob[8 + n + b0 : 8 + n + b1])
    return blob[: 8 + n], out


def tree_hash(path: Path) -> str:
    """A hash of every file (names and bytes) under ``path`` (or of the file itself)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        h.update(str(p.relative_to(path.parent)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units of the last place between two same-dtype tensors
    (ordered-integer view of the bit patterns)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.dtype == torch.float32:
        ia, ib = a.view(torch.int32).to(torch.int64), b.view(torch.int32).to(torch.int64)
        sign = 1 << 31
    else:
        ia, ib = a.view(torch.int16).to(torch.int64), b.view(torch.int16).to(torch.int64)
        sign = 1 << 15

    def ordered(i: torch.Tensor) -> torch.Tensor:
        return torch.where(i < 0, -(i + sign), i)

    return int((ordered(ia) - ordered(ib)).abs().max())
