"""Uni-LoRA adapters as llama.cpp LoRA GGUF files, offline and without torch.

:func:`export_gguf` writes what llama.cpp's ``convert_lora_to_gguf.py`` writes for the
PEFT LoRA equivalent of an adapter (``export_lora``), without the PEFT folder and
without torch: the factors come from the Rust core (the path ``export_lora`` uses, for
every projection), tensor names, the Llama-family q/k row permutation, the output
dtypes and the metadata follow the converter, and the file is written with the ``gguf``
package (numpy only) that the converter uses. The one deliberate difference is GPT-2
(docs/GGUF.md): the converter transposes the factors of GPT-2's ``Conv1D`` modules as
if they were stored like the ``Conv1D`` weight, which gives llama.cpp factors whose
shapes do not match the model; here they keep the orientation of a linear layer's
factors, the one llama.cpp expects.

>>> import unilora_rs as ur
>>> ur.export_gguf("my-adapter", "my-lora.gguf", base="llama-7b/")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import _core
from .._util import PathArg, as_path, incomplete, write_atomic, write_bytes_atomic
from ..adapter import AdapterConfig, adapter_directory, load_adapter, load_adapter_config
from ..errors import FormatError, InvalidArgumentError, MismatchError
from ..extras import require

__all__ = [
    "GGUF_ARCHITECTURES",
    "GGUF_OUTTYPES",
    "GGUF_SAVED_MODULES",
    "GgufExportResult",
    "export_gguf",
]

#: Base model architectures (``config.json``'s ``architectures[0]``) and the llama.cpp
#: model of each, as llama.cpp's converter maps them.
GGUF_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "LLAMA",
    "MistralForCausalLM": "LLAMA",
    "Qwen2ForCausalLM": "QWEN2",
    "GemmaForCausalLM": "GEMMA",
    "GPT2LMHeadModel": "GPT2",
    "Phi3ForCausalLM": "PHI3",
}

#: ``outtype`` values, as the converter's ``--outtype`` (its ``auto`` fails on every LoRA
#: adapter in llama.cpp's converter of llama-cpp-python 0.3.36: it calls ``dim()`` on its
#: LoRA tensor wrapper; for float32 factors it would mean ``f16``).
GGUF_OUTTYPES = ("f32", "f16", "bf16", "q8_0")

#: ``saved_modules`` values (llama.cpp has no place for saved modules: no ``"keep"``).
GGUF_SAVED_MODULES = ("error", "drop", "separate")

# The converter's per-architecture tensor rules (conversion/llama.py, gpt2.py, gemma.py).
_PERMUTED = {"LLAMA"}  # LlamaModel.undo_permute: q/k rows reordered for llama.cpp's RoPE
_GPT2_CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")


@dataclass(frozen=True)
class GgufExportResult:
    """What :func:`export_gguf` wrote."""

    out: Path
    architecture: str
    modules: int
    tensors: int
    outtype: str
    #: Tensors written per GGUF type (``{"F32": 56}``; q8_0 falls back to F16 for rows
    #: that are not a multiple of 32, as the converter does).
    tensor_types: dict[str, int]
    lora_parameters: int
    bytes_written: int
    seconds: float
    saved_tensors: int = 0
    saved_file: Path | None = None


def _gguf() -> Any:
    require("export_gguf", ["gguf"])
    import gguf

    return gguf


def _base_hparams(base: Path) -> tuple[dict[str, Any], Path]:
    """The base model's config (``config.json`` of folder ``base``, or the file), with
    ``text_config`` lifted to the top as the converter does."""
    path = base / "config.json" if base.is_dir() else base
    try:
        hparams = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: no config.json (--base must be the base model's folder)"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FormatError(f"{path}: not a JSON config ({err})") from err
    if not isinstance(hparams, dict):
        raise FormatError(f"{path}: not a JSON object")
    if isinstance(hparams.get("text_config"), dict):
        hparams = {**hparams, **hparams["text_config"]}
    return hparams, path.parent


def _find(hparams: dict[str, Any], keys: list[str], what: str, source: Path) -> Any:
    for key in keys:
        if key in hparams:
            return hparams[key]
    raise FormatError(f"{source}: config.json has no {what} ({', '.join(keys)})")


def _architecture(hparams: dict[str, Any], source: Path) -> str:
    arches = hparams.get("architectures")
    arch = arches[0] if isinstance(arches, list) and arches else None
    if arch not in GGUF_ARCHITECTURES:
        supported = ", ".join(GGUF_ARCHITECTURES)
        raise InvalidArgumentError(
            f"base architecture {arch!r} ({source / 'config.json'}) is not supported by "
            f"export_gguf; supported: {supported}"
        )
    return arch


def _permute_rows(b: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """The converter's ``LlamaModel.permute`` applied to ``W = B @ A``: only ``B``'s rows
    move (each head's two rotary halves interleaved)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    rows, r = b.shape
    return np.ascontiguousarray(
        b.reshape(n_head, 2, rows // n_head // 2, r).swapaxes(1, 2).reshape(rows, r)
    )


def _out_path(out: Path, adapter_dir: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise IsADirectoryError(f"{out}: the output must be a .gguf file path, not a folder")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True / --overwrite to replace it)")
    resolved = out.resolve()
    adapter_r = adapter_dir.resolve()
    if resolved == adapter_r or adapter_r in resolved.parents:
        raise InvalidArgumentError(
            f"output {out} is inside the adapter folder {adapter_dir}; the inputs are never "
            "modified: choose a path outside it"
        )


def _saved_companion(out: Path) -> Path:
    return out.with_name(f"{out.stem}.saved_modules.safetensors")


def export_gguf(
    adapter: PathArg,
    out: PathArg,
    *,
    base: PathArg | None = None,
    outtype: str = "f32",
    saved_modules: str = "error",
    overwrite: bool = False,
    show_progress: bool = False,
) -> GgufExportResult:
    """Writes a llama.cpp LoRA adapter GGUF (``llama-cli --lora``, ``llama_cpp.Llama(
    lora_path=...)``) equivalent to the Uni-LoRA adapter ``adapter``.

    ``base`` is the base model's folder (only its ``config.json`` is read: the
    architecture, layer and head counts); by default the adapter's
    ``base_model_name_or_path`` when that is a local folder. Supported architectures:
    :data:`GGUF_ARCHITECTURES` (Llama / Mistral, Qwen2, Gemma, GPT-2, Phi-3).

    Tensors are named as llama.cpp names the base weight plus ``.lora_a`` (``A``,
    ``r x in``) and ``.lora_b`` (``B``, ``out x r``), e.g. ``blk.0.attn_q.weight.lora_a``;
    for Llama / Mistral the rows of ``B`` of ``q_proj`` and ``k_proj`` are permuted as
    the converter permutes the weights. Metadata: ``general.architecture``,
    ``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha``,
    ``general.name`` (from the adapter folder, as the converter derives it) and
    ``general.quantization_version``. ``outtype`` is ``"f32"`` (default, exact),
    ``"f16"``, ``"bf16"`` or ``"q8_0"``, each as the converter encodes it.

    ``saved_modules`` is as for :func:`unilora_rs.export_lora` (llama.cpp has no place
    for them): ``"error"`` refuses an adapter with ``modules_to_save``, ``"drop"``
    leaves them out and ``"separate"`` writes them to ``<out stem>.saved_modules.safetensors``
    beside ``out``. A module llama.cpp's tensor map does not know, or an unsupported
    architecture, raises :class:`InvalidArgumentError` naming what is supported. The
    file is written to a temporary file beside ``out`` and renamed when complete; the
    inputs are never modified.
    """
    gguf = _gguf()
    t0 = time.perf_counter()
    adapter_p, out_p = as_path("adapter", adapter), as_path("out", out)
    _check_choices(outtype, saved_modules)
    plan = _plan(gguf, adapter_p, out_p, base, saved_modules, overwrite)
    writer, types = _lora_writer(gguf, plan, outtype)
    saved_file, size = _write_files(writer, out_p, plan.extra, overwrite, show_progress)
    return GgufExportResult(
        out=out_p,
        architecture=gguf.MODEL_ARCH_NAMES[plan.arch],
        modules=len(plan.config.modules),
        tensors=2 * len(plan.config.modules),
        outtype=outtype,
        tensor_types=types,
        lora_parameters=plan.config.total_size,
        bytes_written=size,
        seconds=time.perf_counter() - t0,
        saved_tensors=len(plan.extra) if saved_modules != "drop" else 0,
        saved_file=saved_file,
    )


def _check_choices(outtype: str, saved_modules: str) -> None:
    if outtype not in GGUF_OUTTYPES:
        raise InvalidArgumentError(
            f"outtype must be one of {', '.join(GGUF_OUTTYPES)}, got {outtype!r}"
        )
    if saved_modules not in GGUF_SAVED_MODULES:
        raise InvalidArgumentError(
            f"saved_modules must be one of {', '.join(GGUF_SAVED_MODULES)}, got {saved_modules!r}"
        )


@dataclass(frozen=True)
class _Plan:
    """What :func:`export_gguf` writes, resolved and checked before any factor is
    computed: the adapter, the base model's config and llama.cpp's tensor names."""

    config: AdapterConfig
    adapter_dir: Path
    hparams: dict[str, Any]
    base_dir: Path
    hf_arch: str
    #: The llama.cpp model (a ``gguf.MODEL_ARCH`` member).
    arch: Any
    #: The llama.cpp tensor of every module, in the adapter's order.
    names: list[str]
    #: The saved modules written to the companion file (``saved_modules="separate"``).
    extra: dict[str, np.ndarray]


def _plan(
    gguf: Any,
    adapter_p: Path,
    out_p: Path,
    base: PathArg | None,
    saved_modules: str,
    overwrite: bool,
) -> _Plan:
    adapter_dir = adapter_directory(adapter_p)
    config = load_adapter_config(adapter_dir)
    hparams, base_dir = _base_hparams(as_path("base", _base_folder(config, base)))
    hf_arch = _architecture(hparams, base_dir)
    arch = getattr(gguf.MODEL_ARCH, GGUF_ARCHITECTURES[hf_arch])
    block_count = _count(
        hparams, ["n_layers", "num_hidden_layers", "n_layer", "num_layers"], "layer count", base_dir
    )
    tensor_map = gguf.get_tensor_name_map(arch, block_count)
    _out_path(out_p, adapter_dir, overwrite)
    names = _tensor_names(config, tensor_map, hf_arch, block_count, base_dir)
    _check_shapes(config, hparams, hf_arch, base_dir)
    extra = _saved_tensors(config, saved_modules, adapter_dir)
    return _Plan(config, adapter_dir, hparams, base_dir, hf_arch, arch, names, extra)


def _count(hparams: dict[str, Any], keys: list[str], what: str, source: Path) -> int:
    """A positive integer of the base config (a layer, head or feature count)."""
    value = _find(hparams, keys, what, source)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        key = next(k for k in keys if k in hparams)
        raise FormatError(
            f"{source / 'config.json'}: {key} ({what}) must be a positive integer, got {value!r}"
        )
    return value


def _head_counts(hparams: dict[str, Any], source: Path) -> tuple[int, int | None]:
    """``(heads, key/value heads or None)`` of a Llama-family config, checked."""
    n_head = _count(hparams, ["n_heads", "num_attention_heads"], "head count", source)
    if hparams.get("n_kv_heads", hparams.get("num_key_value_heads")) is None:
        return n_head, None
    n_kv = _count(hparams, ["n_kv_heads", "num_key_value_heads"], "key/value head count", source)
    return n_head, n_kv


def _check_shapes(
    config: AdapterConfig, hparams: dict[str, Any], hf_arch: str, source: Path
) -> None:
    """Every adapted layer reads or writes the base model's hidden size, and the rows
    of Llama's q/k projections split into the heads the permutation moves."""
    hidden = _count(hparams, ["hidden_size", "n_embd", "d_model"], "hidden size", source)
    heads = _head_counts(hparams, source) if GGUF_ARCHITECTURES[hf_arch] in _PERMUTED else None
    for m in config.modules:
        if hidden not in (m.in_features, m.out_features):
            raise MismatchError(
                f"module {m.name!r} maps {m.in_features} -> {m.out_features} features and "
                f"{source / 'config.json'} has hidden size {hidden}: is it the adapter's "
                "base model?"
            )
        if heads is not None and m.name.endswith(("q_proj", "k_proj")):
            n = heads[0] if m.name.endswith("q_proj") or heads[1] is None else heads[1]
            if m.out_features % (2 * n):
                raise MismatchError(
                    f"module {m.name!r} has {m.out_features} output rows, which {n} heads of "
                    f"two rotary halves each do not divide ({source / 'config.json'}): is it "
                    "the adapter's base model?"
                )


def _base_folder(config: AdapterConfig, base: PathArg | None) -> PathArg:
    """``base``, else the adapter's ``base_model_name_or_path`` when that is a local
    model folder."""
    if base is not None:
        return base
    named = config.base_model_name_or_path
    if named is None or not (Path(named) / "config.json").is_file():
        raise InvalidArgumentError(
            "export_gguf needs the base model's folder (base= / --base DIR, for its "
            f"config.json); the adapter names {named!r}, which is not a local folder"
        )
    return named


_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def _tensor_names(
    config: AdapterConfig, tensor_map: Any, hf_arch: str, block_count: int, source: Path
) -> list[str]:
    """The llama.cpp tensor of every module; one llama.cpp does not know raises, and so
    does one in a layer the base model does not have."""
    names: list[str] = []
    for m in config.modules:
        layer = _LAYER.search(f".{m.name}")
        if layer is not None and int(layer.group(1)) >= block_count:
            raise MismatchError(
                f"module {m.name!r} is in layer {layer.group(1)}, and "
                f"{source / 'config.json'} has {block_count} layers: is it the adapter's "
                "base model?"
            )
        hf_name = m.name.replace("language_model.", "")
        if GGUF_ARCHITECTURES[hf_arch] == "LLAMA":
            hf_name = hf_name.replace("text_model.", "")
        new_name = tensor_map.get_name(key=f"{hf_name}.weight", try_suffixes=(".weight", ".bias"))
        skipped = GGUF_ARCHITECTURES[hf_arch] == "GEMMA" and hf_name == "lm_head"
        if new_name is None or skipped or new_name.startswith("token_embd."):
            raise InvalidArgumentError(
                f"module {m.name!r} has no llama.cpp LoRA tensor for {hf_arch}; export_gguf "
                "supports the attention and MLP projections of each layer "
                "(blk.N.attn_q / attn_k / attn_v / attn_qkv / attn_output, ffn_gate / ffn_up "
                "/ ffn_down) and the output head where llama.cpp's tensor map has one"
            )
        names.append(new_name)
    return names


def _saved_tensors(
    config: AdapterConfig, saved_modules: str, adapter_dir: Path
) -> dict[str, np.ndarray]:
    """The ``modules_to_save`` tensors to write beside the GGUF file (none unless
    ``"separate"``); an adapter with some raises under ``"error"``."""
    saved_names = list(config.modules_to_save)
    extra: dict[str, np.ndarray] = {}
    if saved_names:
        if saved_modules == "error":
            raise InvalidArgumentError(
                f"the adapter has modules_to_save ({', '.join(saved_names)}), which vLLM's "
                "LoRA loader and llama.cpp's convert_lora_to_gguf.py reject; export-gguf "
                'with saved_modules="drop" leaves them out, "separate" writes them to a '
                "companion .safetensors file"
            )
        if saved_modules == "separate":
            extra = load_adapter(adapter_dir)[2]
    return extra


def _lora_writer(gguf: Any, plan: _Plan, outtype: str) -> tuple[Any, dict[str, int]]:
    """A GGUF writer holding every module's factors and the metadata, and the number of
    tensors written per GGUF type."""
    factors = _core.lora_factors(plan.adapter_dir)
    if len(factors) != len(plan.config.modules):  # pragma: no cover - the core's contract
        raise MismatchError("the core returned factors for another module list")
    # The converter's --outtype, through its LlamaFileType, as a GGML tensor type.
    qtype = {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }[outtype]
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[plan.arch])
    types = _add_factors(gguf, writer, plan, factors, qtype)
    _add_metadata(gguf, writer, plan)
    return writer, types


def _add_factors(
    gguf: Any, writer: Any, plan: _Plan, factors: list[tuple[np.ndarray, np.ndarray]], qtype: Any
) -> dict[str, int]:
    """Adds ``A`` and ``B`` of every module, encoded as the converter encodes them;
    returns the number of tensors per GGUF type."""
    permuted = GGUF_ARCHITECTURES[plan.hf_arch] in _PERMUTED
    n_head, n_head_kv = _head_counts(plan.hparams, plan.base_dir) if permuted else (1, None)
    types: dict[str, int] = {}
    for m, new_name, (b, a) in zip(plan.config.modules, plan.names, factors, strict=True):
        if permuted and m.name.endswith(("q_proj", "k_proj")):
            b = _permute_rows(b, n_head, None if m.name.endswith("q_proj") else n_head_kv)
        for suffix, data in ((".lora_a", a), (".lora_b", b)):
            t = qtype
            try:
                encoded = gguf.quants.quantize(data, t)
            except gguf.QuantError:
                t = gguf.GGMLQuantizationType.F16  # the converter's fallback
                encoded = gguf.quants.quantize(data, t)
            writer.add_tensor(new_name + suffix, encoded, raw_dtype=t)
            types[t.name] = types.get(t.name, 0) + 1
    return types


def _add_metadata(gguf: Any, writer: Any, plan: _Plan) -> None:
    """The metadata, in the converter's order (ModelBase.prepare_metadata, LoraModel)."""
    total_params = writer.get_total_parameter_count()[0]
    metadata = gguf.Metadata.load(None, plan.adapter_dir, None, total_params)
    if metadata.name is None:
        metadata.name = plan.base_dir.name
    if metadata.size_label is None and total_params > 0:  # pragma: no cover - LoRA: < 0
        metadata.size_label = gguf.size_label(*writer.get_total_parameter_count())
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    metadata.set_gguf_meta_model(writer)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(plan.config.alpha))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _check_written(tmp: Path, out: Path, tensors: int) -> None:
    """Re-reads the written GGUF file: its header, and every tensor's data inside the
    file (numpy's ``tofile``, which the gguf package writes with, can lose a failed
    write on a full disk)."""
    gguf = _gguf()
    size = tmp.stat().st_size
    try:
        reader = gguf.GGUFReader(tmp)
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
        found = len(reader.tensors)
        del reader
    except Exception:  # a truncated file fails in many ways (ValueError, ...)
        raise incomplete(out, f"{size:,} bytes, which do not read back as GGUF") from None
    if found != tensors or end > size:
        raise incomplete(out, f"{size:,} bytes, {found} of {tensors} tensors")


def _write_files(
    writer: Any, out_p: Path, extra: dict[str, np.ndarray], overwrite: bool, show_progress: bool
) -> tuple[Path | None, int]:
    """Writes the companion file of the saved modules (if any), then the GGUF file,
    each atomically; the companion is removed when the GGUF file fails. Returns the
    companion's path and the GGUF file's size."""
    saved_file = None
    if extra:
        from safetensors.numpy import save

        saved_file = _saved_companion(out_p)
        if saved_file.exists() and not overwrite:
            raise FileExistsError(f"{saved_file} exists (pass --overwrite to replace it)")
        write_bytes_atomic(saved_file, save(extra))
    tensors = sum(len(shard) for shard in writer.tensors)

    def write(tmp: Path) -> None:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=show_progress)
        writer.close()

    try:
        size = write_atomic(out_p, write, check=lambda tmp: _check_written(tmp, out_p, tensors))
    except BaseException:
        writer.close()
        if saved_file is not None:
            saved_file.unlink(missing_ok=True)
        raise
    if show_progress:
        sys.stderr.flush()
    return saved_file, size
