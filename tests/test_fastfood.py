"""The Fastfood projection (docs/SPEC.md section 4): golden vectors, the spec's numpy
reference, Rust = torch bit for bit, the isometry figure, training and the adapter tools."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import reference as ref
import unilora_rs as ur
from unilora_rs import _core
from unilora_rs.cli import main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tiny_models import VOCAB, tiny_gpt2, tiny_llama  # noqa: E402
from unilora_rs.errors import InvalidArgumentError  # noqa: E402
from unilora_rs.torch import UniLoRAConfig, UniLoRAModel, get_unilora_model  # noqa: E402
from unilora_rs.torch.fastfood import fastfood_backward, fastfood_forward  # noqa: E402
from unilora_rs.torch.params import FastfoodParams  # noqa: E402

GOLDEN = json.loads((Path(__file__).parent / "data" / "golden_fastfood.json").read_text())


def golden_inputs(total: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """SPEC 4.6: theta_d[j] = ((j mod 7) - 3) / 16, grad[i] = ((i mod 5) - 2) / 8."""
    theta = ((np.arange(d) % 7 - 3) / 16).astype(np.float32)
    grad = ((np.arange(total) % 5 - 2) / 8).astype(np.float32)
    return theta, grad


def sha(x: np.ndarray) -> str:
    return hashlib.sha256(x.astype("<f4").tobytes()).hexdigest()


def bits(x: np.ndarray | torch.Tensor) -> list[int]:
    arr = x.numpy() if isinstance(x, torch.Tensor) else x
    return np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32).tolist()


def forward(theta: np.ndarray, seed: int, total: int) -> np.ndarray:
    (out,) = ur.reconstruct(theta, seed, [(total, 1)], projection="fastfood")
    return out.ravel()


@pytest.mark.parametrize("case", GOLDEN, ids=lambda g: f"{g['seed']}-{g['total']}")
def test_golden_vectors(case: dict) -> None:
    seed, total, d = case["seed"], case["total"], case["d"]
    params = _core.fastfood_params(seed, total, d)
    assert (params["n"], params["blocks"]) == (case["n"], case["blocks"])
    assert [f"0x{w:08x}" for w in params["keys"][0]] == case["block0_words"]
    assert f"0x{int(params['scales'][0:1].view(np.uint32)[0]):08x}" == case["c0_bits"]
    theta, grad = golden_inputs(total, d)
    out = forward(theta, seed, total)
    assert [f"0x{b:08x}" for b in bits(out[:8])] == case["theta_D_bits"]
    assert sha(out) == case["theta_D_sha256"]
    assert sha(ur.reconstruct_backward(grad, seed, d, projection="fastfood")) == case["grad_sha256"]
    # The independent numpy implementation of the spec text gives the same bits.
    assert sha(ref.fastfood_forward(theta, seed, total)) == case["theta_D_sha256"]
    assert sha(ref.fastfood_backward(grad, seed, d)) == case["grad_sha256"]
    assert ref.fastfood_block_words(seed, 0) == [int(w, 16) for w in case["block0_words"]]


@pytest.mark.parametrize(
    ("seed", "total", "d"),
    [(0, 1000, 100), (3, 7, 1), (2**64 - 1, 70_001, 9_000), (9, 65536, 8192)],
)
def test_rust_equals_torch_bit_for_bit(seed: int, total: int, d: int) -> None:
    rng = np.random.default_rng(seed % 1000)
    theta = rng.uniform(-0.02, 0.02, d).astype(np.float32)
    theta[::5] = 0.0  # signed zeros follow the spec too
    grad = rng.standard_normal(total).astype(np.float32)
    p = FastfoodParams.create(seed, total, d)
    assert bits(fastfood_forward(torch.from_numpy(theta), p)) == bits(forward(theta, seed, total))
    rust_grad = ur.reconstruct_backward(grad, seed, d, projection="fastfood")
    assert bits(fastfood_backward(torch.from_numpy(grad), p)) == bits(rust_grad)


def test_backward_is_the_adjoint() -> None:
    seed, total, d = 4, 30_000, 1_500
    rng = np.random.default_rng(0)
    x = rng.standard_normal(d).astype(np.float32)
    g = rng.standard_normal(total).astype(np.float32)
    px = forward(x, seed, total).astype(np.float64)
    ptg = ur.reconstruct_backward(g, seed, d, projection="fastfood").astype(np.float64)
    lhs, rhs = float(px @ g), float(x @ ptg)
    assert abs(lhs - rhs) <= 1e-6 * np.linalg.norm(px) * np.linalg.norm(g)


def isometry_error(seed: int, total: int, d: int) -> tuple[float, float]:
    """``(||P^T P - I||_2, max |diag(P^T P) - 1|)`` with ``P`` built column by column."""
    eye = np.eye(d, dtype=np.float32)
    cols = [forward(eye[j], seed, total) for j in range(d)]
    p = np.stack(cols, axis=1).astype(np.float64)
    gram = p.T @ p - np.eye(d)
    return float(np.linalg.norm(gram, 2)), float(np.abs(np.diag(gram)).max())


def test_nearly_isometric() -> None:
    """``P^T P = I`` on the diagonal (to float32 rounding) for whole blocks; off the
    diagonal the deviation is that of a random projection: its spectral norm is about
    ``3 sqrt(d / D)`` (docs/SPEC.md section 4.5 has the figures)."""
    for total, d, bound in [(4096, 256, 1.3), (16384, 256, 0.6)]:
        spectral, diagonal = isometry_error(0, total, d)
        assert diagonal < 1e-6
        assert spectral < bound, (total, d, spectral)
    # A cut last block keeps the diagonal within its share of a block.
    _, diagonal = isometry_error(1, 4096 + 100, 256)
    assert diagonal < 1.0 / 17 + 1e-6


def test_training_lowers_the_loss_and_backends_agree() -> None:
    batch = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    losses = {}
    for backend in ("rust", "torch"):
        torch.manual_seed(0)
        cfg = UniLoRAConfig(
            rank=2, vector_length=300, target_modules="all-linear", projection="fastfood"
        )
        model = get_unilora_model(
            tiny_llama(), UniLoRAConfig(**{**cfg.to_dict(), "backend": backend})
        )
        opt = torch.optim.AdamW([model.theta_d], lr=1e-2)
        run = []
        for _ in range(12):
            loss = model(batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.append(loss.item())
        losses[backend] = run
    assert losses["rust"][-1] < losses["rust"][0] - 0.05
    assert losses["rust"] == losses["torch"]  # the same bits, step after step


def test_adapter_tools_take_fastfood(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = get_unilora_model(
        tiny_gpt2(), UniLoRAConfig(rank=2, vector_length=200, projection="fastfood")
    )
    with torch.no_grad():
        model.theta_d.uniform_(-0.5, 0.5)
    adapter = model.save_pretrained(tmp_path / "ff")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["projection"], config["spec_version"]) == ("fastfood", 2)
    assert ur.load_adapter_config(adapter).expected_fingerprint() == config["fingerprint"]
    # inspect, export-lora and reconstruct agree with the model's own matrices
    assert main(["inspect", str(adapter)]) == 0
    assert "fastfood" in capsys.readouterr().out
    ur.export_lora(adapter, tmp_path / "lora")
    from safetensors.numpy import load_file

    lora = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    for name, (a, b) in model.lora_matrices().items():
        assert np.array_equal(lora[f"base_model.model.{name}.lora_A.weight"], a.numpy())
        assert np.array_equal(lora[f"base_model.model.{name}.lora_B.weight"], b.numpy())
    # the merge equals merge_and_unload; from_pretrained gives the same outputs
    base_dir = tmp_path / "base"
    tiny_gpt2().save_pretrained(base_dir)
    ur.merge(base_dir, adapter, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    loaded = UniLoRAModel.from_pretrained(tiny_gpt2(), adapter)
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
        assert torch.equal(loaded(ids).logits, want)
        assert torch.allclose(merged(ids).logits, want, atol=1e-5)


def test_fastfood_errors() -> None:
    with pytest.raises(InvalidArgumentError, match="not one of"):
        UniLoRAConfig(projection="dense")
    with pytest.raises(InvalidArgumentError, match="projection_map"):
        UniLoRAConfig(projection="explicit")
    with pytest.raises(InvalidArgumentError, match="cached"):
        get_unilora_model(
            tiny_llama(),
            UniLoRAConfig(
                vector_length=64,
                target_modules="all-linear",
                projection="fastfood",
                index_mode="cached",
            ),
        )
    with pytest.raises(InvalidArgumentError, match="not one of"):
        ur.reconstruct(np.zeros(4, np.float32), 0, [(4, 4)], projection="dense")
    with pytest.raises(InvalidArgumentError, match="stored map"):
        ur.reconstruct(np.zeros(4, np.float32), 0, [(4, 4)], projection="explicit")
    with pytest.raises(InvalidArgumentError, match="d = 17 is larger"):
        ur.reconstruct(np.zeros(17, np.float32), 0, [(4, 4)], projection="fastfood")
    with pytest.raises(ur.VectorError):
        ur.reconstruct(np.full(4, np.nan, np.float32), 0, [(4, 4)], projection="fastfood")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_on_gpu_equals_the_rust_core() -> None:
    seed, total, d = 3, 300_000, 20_000
    rng = np.random.default_rng(1)
    theta = rng.uniform(-0.02, 0.02, d).astype(np.float32)
    grad = rng.standard_normal(total).astype(np.float32)
    p = FastfoodParams.create(seed, total, d)
    out = fastfood_forward(torch.from_numpy(theta).cuda(), p).cpu()
    assert bits(out) == bits(forward(theta, seed, total))
    back = fastfood_backward(torch.from_numpy(grad).cuda(), p).cpu()
    assert bits(back) == bits(ur.reconstruct_backward(grad, seed, d, projection="fastfood"))
