"""ONNX export of a merged model, verified with onnxruntime before it is written.

:func:`export_onnx` takes a plain torch model (typically ``merge_and_unload()``'s
result), exports it with ``torch.onnx.export(dynamo=True)`` with dynamic batch and
sequence axes, runs the graph with onnxruntime on sample inputs of other shapes and
compares it with torch, and only then renames the file into place.
:func:`export_adapter_onnx` does the whole job from folders: base model (saved with
transformers) + Uni-LoRA adapter -> merged ONNX graph.

Weights go into the ``.onnx`` file itself unless they are too large for one protobuf
message (2 GiB) or external data is asked for: then they go into ``OUT.onnx.data``
beside it (the graph refers to that file by its name, relative to the ``.onnx``).
Memory: the graph shares the model's tensors and is written tensor by tensor, torch's
reference outputs are computed before onnxruntime maps the written weights, and
:func:`export_adapter_onnx` frees the model it loaded before that, so the peak stays
near one copy of the weights.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...adapter import CONFIG_NAME
from ...errors import FormatError, InvalidArgumentError, MismatchError
from ...extras import require
from ..model import UniLoRAModel
from .onnx_files import (
    SINGLE_FILE_LIMIT,
    Progress,
    WeightFiles,
    check_existing,
    plan_files,
    write_files,
)

__all__ = [
    "SINGLE_FILE_LIMIT",
    "ExportReport",
    "export_adapter_onnx",
    "export_onnx",
    "load_base_model",
]


@dataclass(frozen=True)
class ExportReport:
    """What was exported and how well onnxruntime agreed with torch.

    ``data_path`` is the external-data file beside ``path`` (``None`` when the weights
    are inside the ``.onnx`` file); ``auto_external`` says it was chosen because the
    weights (``weight_bytes``) exceed :data:`SINGLE_FILE_LIMIT`.
    """

    path: Path
    output_name: str
    max_abs_diff: float
    checked_shapes: tuple[tuple[int, int], ...]
    opset: int
    weight_bytes: int = 0
    data_path: Path | None = None
    auto_external: bool = False


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
    loggers = [
        logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")
    ]
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


#: The opset torch.onnx builds the graph in; other opsets are converted from it.
_NATIVE_OPSET = 18


def _max_opset() -> int:
    """The newest opset the installed onnx knows (torch.onnx converts up to it)."""
    require("ONNX export")
    import onnx

    return int(onnx.defs.onnx_opset_version())


def _opset_refusal(opset: object, why: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"opset {opset} {why}: torch.onnx writes opsets {_NATIVE_OPSET} to {_max_opset()} "
        "(lower ones only when it can convert every operator of the graph)"
    )


def _check_opset(opset: object) -> int:
    """``opset`` when it can be asked for (an integer from 1 up to :func:`_max_opset`)."""
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise InvalidArgumentError(f"opset must be an integer, got {opset!r}")
    if not 1 <= opset <= _max_opset():
        raise _opset_refusal(opset, "is not supported")
    return opset


def _drop_weights(model: Any) -> None:
    """Lets go of the graph's initializer tensors (torch's weights and lazy transposes)."""
    for value in model.graph.initializers.values():
        value.const_value = None


def _free_tensors(model: nn.Module) -> None:
    """Frees the storage of every parameter and buffer of ``model`` (which is ours)."""
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            tensor.data = torch.empty(0, dtype=tensor.dtype)


def export_onnx(
    model: nn.Module,
    out_path: str | os.PathLike[str],
    *,
    vocab_size: int | None = None,
    batch: int = 2,
    seq_len: int = 16,
    opset: int = _NATIVE_OPSET,
    atol: float = 1e-4,
    seed: int = 0,
    external_data: bool | None = None,
    progress: Progress | None = None,
    overwrite: bool = False,
) -> ExportReport:
    """Exports ``model`` (``input_ids``, ``attention_mask`` -> ``logits``) to ``out_path``.

    The graph is checked with onnxruntime against torch on two inputs of other shapes
    (one with padding); a difference above ``atol`` on non-padded positions raises
    :class:`MismatchError` and nothing is written. The file appears atomically.

    ``external_data``: ``None`` (default) embeds the weights in the ``.onnx`` file unless
    they exceed :data:`SINGLE_FILE_LIMIT`, then writes them to ``OUT.onnx.data``;
    ``True`` always writes ``OUT.onnx.data``; ``False`` always embeds them (an error
    above the limit). With external data both files are staged in a temporary folder
    beside ``out_path`` and renamed into place, the data file first. An existing
    output file (or data file) raises :class:`FileExistsError` unless ``overwrite``.
    ``opset`` is the opset written: torch.onnx builds opset 18 and converts to the
    others, up to the newest the installed onnx knows; one out of that range, or a lower
    one the graph does not convert to, raises :class:`InvalidArgumentError`.
    ``progress`` receives one line per step of the work.

    Memory: the graph shares ``model``'s tensors. Because the caller still holds
    ``model``, its weights stay in memory while onnxruntime checks the graph (about
    two copies at the peak); :func:`export_adapter_onnx` releases its model first.
    """
    return _export_onnx(
        model,
        out_path,
        owned=False,
        vocab_size=vocab_size,
        batch=batch,
        seq_len=seq_len,
        opset=opset,
        atol=atol,
        seed=seed,
        external_data=external_data,
        progress=progress,
        overwrite=overwrite,
    )


def _onnxruntime() -> Any:
    require("ONNX export")
    import onnxruntime as ort

    return ort


def _check_request(
    model: nn.Module,
    out_path: str | os.PathLike[str],
    vocab_size: int | None,
    batch: int,
    seq_len: int,
    opset: int,
    overwrite: bool,
    external_data: bool | None,
) -> tuple[Path, int]:
    """The output path and the vocabulary size, after checking the request."""
    if batch < 1 or seq_len < 2:
        raise InvalidArgumentError(f"need batch >= 1 and seq_len >= 2, got {batch}, {seq_len}")
    _check_opset(opset)
    out = Path(out_path)
    if out.is_dir():
        raise IsADirectoryError(21, "output path is a directory", str(out))
    data = out.with_name(out.name + ".data")
    check_existing(out, data if external_data else None, overwrite)
    if not out.parent.exists():
        raise FileNotFoundError(2, "output folder does not exist", str(out.parent))
    vocab = vocab_size or int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    if vocab < 1:
        raise InvalidArgumentError("cannot tell the vocabulary size: pass vocab_size")
    return out, vocab


def _trace(
    wrapper: nn.Module, sample: tuple[torch.Tensor, torch.Tensor], opset: int, say: Progress
) -> Any:
    """The ONNX program of ``wrapper``, traced on ``sample``, batch and sequence dynamic."""
    dims = {0: torch.export.Dim("batch", min=1), 1: torch.export.Dim("sequence", min=2)}
    say("exporting the graph with torch.onnx (dynamo)")
    with _quiet(), torch.no_grad():
        program: Any = torch.onnx.export(
            wrapper,
            sample,
            dynamo=True,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_shapes={"input_ids": dims, "attention_mask": dims},
            opset_version=opset,
        )
    # below its own opset the exporter converts what it can and silently keeps its
    # own opset for a graph it cannot convert
    if program.model.opset_imports.get("") != opset:
        raise _opset_refusal(opset, "cannot be written for this graph")
    return program


def _ort_max_diff(
    ort: Any,
    staged: Path,
    files: WeightFiles,
    checks: list[tuple[torch.Tensor, torch.Tensor]],
    expected: list[np.ndarray],
    say: Progress,
) -> float:
    """The largest difference between onnxruntime's outputs of the written graph and
    torch's (non-padded positions)."""
    say("checking the graph with onnxruntime")
    options = ort.SessionOptions()
    if files.external:
        # onnxruntime maps the (aligned) weights from the data file; prepacking would
        # copy every MatMul weight into a packed layout: a second copy of the model
        options.add_session_config_entry("session.disable_prepacking", "1")
    try:
        session = ort.InferenceSession(str(staged), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime's own exception types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FormatError(
            f"onnxruntime cannot load the written ONNX file ({first}); nothing was kept "
            "(a file cut short by a full disk does not load)"
        ) from err
    worst = 0.0
    for (ids, mask), want in zip(checks, expected, strict=True):
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        (got,) = session.run(None, feeds)
        worst = max(worst, _compare(np.asarray(got), want, mask.numpy()))
    return worst


def _export_onnx(
    model: nn.Module,
    out_path: str | os.PathLike[str],
    *,
    owned: bool,
    vocab_size: int | None = None,
    batch: int = 2,
    seq_len: int = 16,
    opset: int = _NATIVE_OPSET,
    atol: float = 1e-4,
    seed: int = 0,
    external_data: bool | None = None,
    progress: Progress | None = None,
    overwrite: bool = False,
) -> ExportReport:
    """:func:`export_onnx`; with ``owned`` the model's tensors are freed once written."""
    ort = _onnxruntime()
    out, vocab = _check_request(
        model, out_path, vocab_size, batch, seq_len, opset, overwrite, external_data
    )
    say = progress or (lambda _line: None)
    wrapper = _Logits(model.eval()).eval()
    program = _trace(wrapper, _sample(batch, seq_len, vocab, seed, pad=1), opset, say)
    written = int(program.model.opset_imports[""])  # the opset the report names
    files = plan_files(program.model, external_data, out, overwrite)
    checks = [
        _sample(batch + 1, seq_len + 3, vocab, seed + 1, pad=0),
        _sample(batch, seq_len, vocab, seed + 2, pad=seq_len // 3),
    ]
    say("computing torch's reference outputs")
    with torch.no_grad():
        expected = [wrapper(ids, mask).float().numpy() for ids, mask in checks]
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        staged = stage / out.name
        write_files(program.model, staged, files, say)
        # release torch's weights before onnxruntime maps the written ones: the graph's
        # (lazy) tensors, and the model's own storage when it is ours (the exporter's
        # rewrite rules keep a reference to the last graph they matched, hence to the
        # model's parameters, so dropping the references alone frees nothing)
        _drop_weights(program.model)
        if owned:
            _free_tensors(model)
        del program, wrapper, model
        gc.collect()
        worst = _ort_max_diff(ort, staged, files, checks, expected, say)
        if not worst <= atol:
            raise MismatchError(
                f"onnxruntime and torch differ by {worst:.3g} (> atol {atol:g}); not written"
            )
        if files.external:
            os.replace(stage / files.data.name, files.data)  # the data first: the graph names it
        os.replace(staged, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return _report(out, files, worst, checks, written)


def _report(
    out: Path,
    files: WeightFiles,
    worst: float,
    checks: list[tuple[torch.Tensor, torch.Tensor]],
    opset: int,
) -> ExportReport:
    return ExportReport(
        path=out,
        output_name="logits",
        max_abs_diff=worst,
        checked_shapes=tuple(tuple(ids.shape) for ids, _ in checks),  # type: ignore[misc]
        opset=opset,
        weight_bytes=files.weight_bytes,
        data_path=files.data if files.external else None,
        auto_external=files.auto,
    )


def load_base_model(path: str | os.PathLike[str], *, show_progress: bool = True) -> nn.Module:
    """Loads a transformers model saved with ``save_pretrained`` (float32, eval mode);
    ``show_progress=False`` hides transformers' loading bar."""
    import transformers
    import transformers.utils.logging as hf_logging

    folder = Path(path)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(2, "no config.json: not a transformers model folder", str(folder))
    config = transformers.AutoConfig.from_pretrained(str(folder))
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        cls = transformers.AutoModel
    shown = hf_logging.is_progress_bar_enabled()
    if not show_progress:
        hf_logging.disable_progress_bar()
    try:
        return cls.from_pretrained(str(folder), dtype=torch.float32).eval()
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _refuse_overwrite(out: Path, data: Path, inputs: tuple[Path, ...]) -> None:
    """Neither the output nor its possible external-data file may be an input."""
    for folder in inputs:
        folder = folder.resolve()
        taken = {folder} | ({f.resolve() for f in folder.iterdir()} if folder.is_dir() else set())
        for path in (out, data):
            if path in taken:
                raise InvalidArgumentError(
                    f"output path {path} is an input; choose another file name"
                )


def _merged_model(src: Path, base_path: Path, progress: Progress | None) -> nn.Module:
    say = progress or (lambda _line: None)
    say(f"loading the base model from {base_path}")
    base = load_base_model(base_path, show_progress=progress is not None)
    say(f"merging the adapter {src}")
    return UniLoRAModel.from_pretrained(base, src).merge_and_unload()


def export_adapter_onnx(
    source: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    **kwargs: Any,
) -> ExportReport:
    """``source`` is an adapter folder (merged into ``base`` first) or a model folder.

    Other keyword arguments go to :func:`export_onnx` (``overwrite``, an existing
    output is checked before any model is loaded). The model loaded here is freed
    once its weights are written, before onnxruntime loads them (one copy at a time).
    """
    src = Path(source)
    if not src.is_dir():
        raise FileNotFoundError(2, "adapter or model folder not found", str(src))
    out = Path(out_path).resolve()
    data = out.with_name(out.name + ".data")
    existing = (out, data if kwargs.get("external_data") else None, bool(kwargs.get("overwrite")))
    _check_opset(kwargs.get("opset", _NATIVE_OPSET))  # before any model is loaded
    if (src / CONFIG_NAME).exists():
        from ...adapter import load_adapter_config

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
        _refuse_overwrite(out, data, (src, base_path))
        check_existing(*existing)
        model = _merged_model(src, base_path, progress)
    else:
        if base is not None:
            raise InvalidArgumentError(
                f"{src} is not an adapter folder; --base is only for adapters"
            )
        _refuse_overwrite(out, data, (src,))
        check_existing(*existing)
        if progress is not None:
            progress(f"loading the model from {src}")
        model = load_base_model(src, show_progress=progress is not None)
    return _export_onnx(model, out, owned=True, progress=progress, **kwargs)
