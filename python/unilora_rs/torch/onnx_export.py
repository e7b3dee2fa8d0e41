"""ONNX export of a merged model, verified with onnxruntime before it is written.

:func:`export_onnx` takes a plain torch model (typically ``merge_and_unload()``'s
result), exports it with ``torch.onnx.export(dynamo=True)`` with dynamic batch and
sequence axes, runs the graph with onnxruntime on sample inputs of other shapes and
compares it with torch, and only then renames the file into place.
:func:`export_adapter_onnx` does the whole job from folders: base model (saved with
transformers) + Uni-LoRA adapter -> merged ONNX graph.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..adapter import CONFIG_NAME
from ..errors import InvalidArgumentError, MismatchError

__all__ = ["ExportReport", "export_adapter_onnx", "export_onnx", "load_base_model"]


@dataclass(frozen=True)
class ExportReport:
    """What was exported and how well onnxruntime agreed with torch."""

    path: Path
    output_name: str
    max_abs_diff: float
    checked_shapes: tuple[tuple[int, int], ...]
    opset: int


class _Logits(nn.Module):
    """``(input_ids, attention_mask) -> logits`` (or ``last_hidden_state``) of a model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if getattr(getattr(self.model, "config", None), "use_cache", False):
            kwargs["use_cache"] = False
        out = self.model(**kwargs)
        for name in ("logits", "last_hidden_state"):
            value = getattr(out, name, None)
            if isinstance(value, torch.Tensor):
                return value
        if isinstance(out, torch.Tensor):
            return out
        if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            return out[0]
        raise InvalidArgumentError(f"cannot find a tensor output in {type(out).__name__}")


def _sample(
    batch: int, seq: int, vocab: int, seed: int, pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    if pad:
        mask[0, seq - pad :] = 0  # right padding on the first row
    return ids, mask


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silences the exporter's progress prints and known warnings during the export."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _compare(ort_out: np.ndarray, torch_out: np.ndarray, mask: np.ndarray) -> float:
    if ort_out.shape != torch_out.shape:
        raise MismatchError(
            f"onnxruntime output shape {ort_out.shape} differs from torch {torch_out.shape}"
        )
    diff = np.abs(ort_out.astype(np.float64) - torch_out.astype(np.float64))
    if diff.ndim >= 2 and diff.shape[:2] == mask.shape:
        diff = diff[mask.astype(bool)]  # padded positions carry no meaning
    return float(diff.max()) if diff.size else 0.0


def export_onnx(
    model: nn.Module,
    out_path: str | os.PathLike[str],
    *,
    vocab_size: int | None = None,
    batch: int = 2,
    seq_len: int = 16,
    opset: int = 18,
    atol: float = 1e-4,
    seed: int = 0,
) -> ExportReport:
    """Exports ``model`` (``input_ids``, ``attention_mask`` -> ``logits``) to ``out_path``.

    The graph is checked with onnxruntime against torch on two inputs of other shapes
    (one with padding); a difference above ``atol`` on non-padded positions raises
    :class:`MismatchError` and nothing is written. The file appears atomically.
    """
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ImportError(
            "ONNX export needs onnx and onnxruntime: pip install 'unilora_rs[onnx]'"
        ) from err
    if batch < 1 or seq_len < 2:
        raise InvalidArgumentError(f"need batch >= 1 and seq_len >= 2, got {batch}, {seq_len}")
    out = Path(out_path)
    if out.is_dir():
        raise IsADirectoryError(21, "output path is a directory", str(out))
    if not out.parent.exists():
        raise FileNotFoundError(2, "output folder does not exist", str(out.parent))
    vocab = vocab_size or int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    if vocab < 1:
        raise InvalidArgumentError("cannot tell the vocabulary size: pass vocab_size")
    model = model.eval()
    wrapper = _Logits(model).eval()
    trace_ids, trace_mask = _sample(batch, seq_len, vocab, seed, pad=1)
    dims = {0: torch.export.Dim("batch", min=1), 1: torch.export.Dim("sequence", min=2)}

    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                wrapper,
                (trace_ids, trace_mask),
                dynamo=True,
                input_names=["input_ids", "attention_mask"],
                output_names=["logits"],
                dynamic_shapes={"input_ids": dims, "attention_mask": dims},
                opset_version=opset,
            )
            program.save(str(tmp))
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        checks = [
            _sample(batch + 1, seq_len + 3, vocab, seed + 1, pad=0),
            _sample(batch, seq_len, vocab, seed + 2, pad=seq_len // 3),
        ]
        worst = 0.0
        for ids, mask in checks:
            with torch.no_grad():
                expected = wrapper(ids, mask).float().numpy()
            (got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
            worst = max(worst, _compare(np.asarray(got), expected, mask.numpy()))
        if not worst <= atol:
            raise MismatchError(
                f"onnxruntime and torch differ by {worst:.3g} (> atol {atol:g}); not written"
            )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportReport(
        path=out,
        output_name="logits",
        max_abs_diff=worst,
        checked_shapes=tuple(tuple(ids.shape) for ids, _ in checks),  # type: ignore[misc]
        opset=opset,
    )


def load_base_model(path: str | os.PathLike[str]) -> nn.Module:
    """Loads a transformers model saved with ``save_pretrained`` (float32, eval mode)."""
    import transformers

    folder = Path(path)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(2, "no config.json: not a transformers model folder", str(folder))
    config = transformers.AutoConfig.from_pretrained(str(folder))
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        cls = transformers.AutoModel
    return cls.from_pretrained(str(folder), dtype=torch.float32).eval()


def _refuse_overwrite(out: Path, inputs: tuple[Path, ...]) -> None:
    for folder in inputs:
        folder = folder.resolve()
        taken = {folder} | ({f.resolve() for f in folder.iterdir()} if folder.is_dir() else set())
        if out in taken:
            raise InvalidArgumentError(f"output path {out} is an input; choose another file name")


def export_adapter_onnx(
    source: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> ExportReport:
    """``source`` is an adapter folder (merged into ``base`` first) or a model folder."""
    from .model import UniLoRAModel

    src = Path(source)
    if not src.is_dir():
        raise FileNotFoundError(2, "adapter or model folder not found", str(src))
    out = Path(out_path).resolve()
    if (src / CONFIG_NAME).exists():
        from ..adapter import load_adapter_config

        cfg = load_adapter_config(src)
        base_path = Path(base) if base is not None else None
        if base_path is None and cfg.base_model_name_or_path:
            candidate = Path(cfg.base_model_name_or_path)
            base_path = candidate if candidate.is_dir() else None
        if base_path is None:
            raise InvalidArgumentError(
                f"{src} is an adapter: give the base model folder with --base "
                f"(the adapter records {cfg.base_model_name_or_path!r})"
            )
        _refuse_overwrite(out, (src, base_path))
        model = UniLoRAModel.from_pretrained(load_base_model(base_path), src).merge_and_unload()
    else:
        if base is not None:
            raise InvalidArgumentError(
                f"{src} is not an adapter folder; --base is only for adapters"
            )
        _refuse_overwrite(out, (src,))
        model = load_base_model(src)
    return export_onnx(model, out, **kwargs)
