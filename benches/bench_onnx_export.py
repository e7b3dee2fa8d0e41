"""Benchmark of ``unilora export-onnx`` on a model over 2 GB (ONNX external data).

Builds (under a temporary folder) a random-init Llama of one decoder layer whose
untied embedding and lm_head (``--vocab`` x 256, fp32) bring the weights over 2 GiB,
saves it with transformers, puts a Uni-LoRA adapter on every linear layer, then
measures, each in its own child process (peak RSS is that process's own, from
``wait4``):

* the interpreter with the same libraries imported (the baseline of both others);
* ``unilora export-onnx`` as shipped (weights written to ``OUT.onnx.data`` tensor by
  tensor, the model freed before onnxruntime maps the written weights);
* the by-hand path it replaces: load the base, merge, ``torch.onnx.export(dynamo=True)``,
  ``ONNXProgram.save`` (which also switches to external data above 1.5 GB), then an
  onnxruntime session with default options on the file, with the model still loaded.

Both check onnxruntime against torch on the same kind of inputs. Prints wall time,
peak RSS and peak RSS / weight bytes for each. Needs about 7 GB of free disk.

    python benches/bench_onnx_export.py
    python benches/bench_onnx_export.py --vocab 1200000 --keep
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BY_HAND = """
import sys, numpy as np, torch, onnxruntime as ort
torch.set_num_threads(1)
from unilora_rs.torch import UniLoRAModel
from unilora_rs.torch.onnx_export import load_base_model
adapter, base, out = sys.argv[1:4]
model = UniLoRAModel.from_pretrained(load_base_model(base), adapter).merge_and_unload()
ids = torch.randint(0, model.config.vocab_size, (2, 16))
mask = torch.ones_like(ids)
dims = {0: torch.export.Dim("batch", min=1), 1: torch.export.Dim("sequence", min=2)}
class Logits(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m
    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
wrapper = Logits(model).eval()
with torch.no_grad():
    program = torch.onnx.export(wrapper, (ids, mask), dynamo=True,
        input_names=["input_ids", "attention_mask"], output_names=["logits"],
        dynamic_shapes={"input_ids": dims, "attention_mask": dims}, opset_version=18)
    program.save(out)
    want = wrapper(ids, mask).numpy()
session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
(got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
print("max |ort - torch|", float(np.abs(got - want).max()))
"""

BUILD = """
import sys, torch, transformers
from unilora_rs.torch import UniLoRAConfig, get_unilora_model
folder, vocab = sys.argv[1], int(sys.argv[2])
cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512,
    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=64, tie_word_embeddings=False)
with torch.device("meta"):
    model = transformers.LlamaForCausalLM(cfg)
model = model.to_empty(device="cpu")
gen = torch.Generator().manual_seed(0)
with torch.no_grad():
    for name, p in model.named_parameters():
        p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0, 0.02, generator=gen)
model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
model.save_pretrained(f"{folder}/base")
print(sum(p.numel() * p.element_size() for p in model.parameters()))
cfg_u = UniLoRAConfig(rank=4, vector_length=256, target_modules="all-linear", init_range=0.3)
get_unilora_model(model, cfg_u).save_pretrained(f"{folder}/adapter")
"""


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stdout) of one child process."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as so:
        proc = subprocess.Popen(cmd, stdout=so, stderr=subprocess.DEVNULL, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        so.seek(0)
        out = so.read()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed with {proc.returncode}")
    return wall, usage.ru_maxrss * 1024, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=1_050_000, help="vocabulary size")
    parser.add_argument("--dir", help="work folder (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench_onnx_"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    py = sys.executable
    try:
        _, _, out = run([py, "-c", BUILD, str(work), str(args.vocab)], env)
        weights = int(out.split()[-1])
        print(f"model: 1-layer Llama, vocab {args.vocab}, hidden 256, fp32, untied")
        print(f"weights: {weights / 1e9:.2f} GB ({weights / 2**30:.2f} GiB)\n")
        imports = "import torch, transformers, onnx, onnxruntime, onnxscript, unilora_rs.torch"
        rows = [("imports only (baseline)", *run([py, "-c", imports], env)[:2])]
        cli = [py, "-m", "unilora_rs", "export-onnx", str(work / "adapter"), str(work / "a.onnx")]
        cli += ["--base", str(work / "base"), "--no-progress"]
        rows.append(("unilora export-onnx", *run(cli, env)[:2]))
        for name in ("a.onnx", "a.onnx.data"):
            (work / name).unlink(missing_ok=True)
        by_hand = [py, "-c", BY_HAND, str(work / "adapter"), str(work / "base")]
        rows.append(
            ("by hand (export, save, ort)", *run([*by_hand, str(work / "b.onnx")], env)[:2])
        )
        print(f"{'path':<30} {'wall s':>8} {'peak RSS GB':>12} {'peak / weights':>15}")
        for name, wall, peak in rows:
            print(f"{name:<30} {wall:8.1f} {peak / 1e9:12.2f} {peak / weights:15.2f}")
        base_rss = rows[0][2]
        print(
            f"\nabove the baseline: unilora {(rows[1][2] - base_rss) / weights:.2f}x the weights, "
            f"by hand {(rows[2][2] - base_rss) / weights:.2f}x; "
            f"peak RSS by hand / unilora: {rows[2][2] / rows[1][2]:.2f}x"
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
