"""ONNX export of a merged model: onnxruntime matches torch within 1e-4."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from tiny_models import tiny_llama  # noqa: E402
from unilora_rs.cli import main  # noqa: E402
from unilora_rs.errors import InvalidArgumentError  # noqa: E402
from unilora_rs.torch import UniLoRAConfig, get_unilora_model  # noqa: E402
from unilora_rs.torch.onnx_export import export_onnx  # noqa: E402


def _tiny_llama() -> torch.nn.Module:
    return tiny_llama(0).eval()


def test_export_merged_model_matches_torch(tmp_path: Path) -> None:
    model = get_unilora_model(
        _tiny_llama(),
        UniLoRAConfig(rank=4, vector_length=512, target_modules="all-linear", init_range=0.3),
    )
    merged = model.merge_and_unload()
    out = tmp_path / "model.onnx"
    report = export_onnx(merged, out)
    assert out.exists() and report.max_abs_diff <= 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary left behind
    # an independent check on yet another shape
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 64, (1, 23), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    (got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        expected = merged(input_ids=ids, attention_mask=mask).logits.numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_cli_export_onnx(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base_dir = tmp_path / "base"
    _tiny_llama().save_pretrained(base_dir)
    base = transformers.LlamaForCausalLM.from_pretrained(str(base_dir))
    model = get_unilora_model(base, UniLoRAConfig(rank=2, vector_length=300, init_range=0.3))
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    out = tmp_path / "merged.onnx"
    # the adapter records its local base folder, so --base may be left out
    assert model.adapter_config.base_model_name_or_path == str(base_dir)
    assert main(["export-onnx", str(adapter_dir), str(out)]) == 0
    assert "onnxruntime matches torch within" in capsys.readouterr().out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    (got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits.numpy()  # unmerged adapter
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)

    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(dict(cfg, base_model_name_or_path="someone/remote-model")))
    assert main(["export-onnx", str(adapter_dir), str(tmp_path / "x.onnx")]) == 1
    err = capsys.readouterr().err
    assert "give the base model folder with --base" in err and "someone/remote-model" in err
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(InvalidArgumentError, match="is an input"):
        from unilora_rs.torch.onnx_export import export_adapter_onnx

        export_adapter_onnx(adapter_dir, adapter_dir / "adapter_config.json", base=base_dir)
