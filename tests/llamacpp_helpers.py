"""llama.cpp's own converters, from the llama-cpp-python sdist on PyPI, as test fixtures.

The sdist vendors llama.cpp, whose ``convert_lora_to_gguf.py`` (with
``convert_hf_to_gguf.py``, ``conversion/`` and its own ``gguf-py``) is the reference
for ``export_gguf``. It is fetched once with pip (``pip download --no-deps
--no-binary``, so pip's cache serves later fetches) and the needed files are unpacked
into ``~/.cache/unilora_rs/`` (or ``$UNILORA_CACHE_DIR``). Tests skip, saying why, only
when the package cannot be fetched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

LLAMA_CPP_PYTHON = "0.3.36"  # llama.cpp's converters and gguf-py 0.19.0 (pinned in dev.txt)
_MEMBERS = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def cache_dir() -> Path:
    root = os.environ.get("UNILORA_CACHE_DIR") or Path.home() / ".cache" / "unilora_rs"
    return Path(root)


def _fetch_sdist(dest: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--no-binary",
        "llama-cpp-python",
        f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
        "-d",
        str(dest),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    found = sorted(dest.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
    if done.returncode != 0 or not found:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"llama-cpp-python=={LLAMA_CPP_PYTHON} sdist not available from pip: {last}")
    return found[0]


def converter_dir() -> Path:
    """The folder holding llama.cpp's converters (fetched and unpacked on first use)."""
    target = cache_dir() / f"llama.cpp-from-llama-cpp-python-{LLAMA_CPP_PYTHON}"
    if (target / "convert_lora_to_gguf.py").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        sdist = _fetch_sdist(Path(tmp))
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        unpacked = Path(tmp) / "llama.cpp"
        with tarfile.open(sdist) as tar:
            members = [
                m
                for m in tar.getmembers()
                if m.name.startswith(prefix)
                and m.name[len(prefix) :].startswith(_MEMBERS)
                and (m.isfile() or m.isdir())
            ]
            for m in members:
                m.name = m.name[len(prefix) :]
            tar.extractall(unpacked, members=members, filter="data")
        try:
            unpacked.rename(target)
        except OSError:  # another process unpacked it first
            shutil.rmtree(unpacked, ignore_errors=True)
    return target


# Runs a converter script as its own ``__main__`` after naming the BPE pre-tokenizer:
# llama.cpp's converter identifies a vocabulary by hashing how it tokenizes a probe text,
# so a test model that pairs one family's vocabulary with another family's
# pre-tokenizer (a tiny Qwen2 with SmolLM's vocabulary) is unknown to it.
_NAMED_PRE = """
import runpy, sys
folder, script, pre = sys.argv[1:4]
sys.argv = [script, *sys.argv[4:]]
sys.path[:0] = [folder, folder + "/gguf-py"]
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
runpy.run_path(script, run_name="__main__")
"""


def run_converter(
    script: str, *args: str | Path, tokenizer_pre: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs one of llama.cpp's converters (with its own gguf-py) in a subprocess;
    ``tokenizer_pre`` names the BPE pre-tokenizer instead of letting it detect one."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("NO_LOCAL_GGUF", None)
    path = converter_dir() / script
    if tokenizer_pre is None:
        cmd = [sys.executable, str(path), *map(str, args)]
    else:
        head = [str(converter_dir()), str(path), tokenizer_pre]
        cmd = [sys.executable, "-c", _NAMED_PRE, *head, *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    return done
