"""Every ```python block of README.md and docs/*.md runs here, so that a documented
example cannot rot.

The blocks of one file run in order in one namespace (a later block uses what an
earlier one made, as a reader would), in a temporary folder that holds small fixtures
under the paths the docs name. Three tables say what the test adds, each with its
reason; nothing else is changed and no block is skipped silently (a block that is in
no table runs as written, and one that cannot run at all must be in CANNOT_RUN):

* FIXTURE_PATHS: the folders the docs name, made here from tiny random models (a
  3-layer Llama, a 2-layer RoBERTa) instead of 7B checkpoints and Hub downloads;
* SUBSTITUTIONS: text replaced in a block before it runs (the 7B settings);
* PROSE: names a block takes from its surrounding text (``base``, ``loader``, ``ids``),
  defined before that block.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("docs/*.md"))]

#: (text in a block, replacement, why).
SUBSTITUTIONS: list[tuple[str, str, str]] = [
    (
        "vector_length=2**19",
        "vector_length=2**12",
        "d = 2^19 is the 7B setting; the tiny Llama's D is 5,376 to 49,152",
    ),
    (
        "learning_rate=1e-2)",
        "learning_rate=1e-2, use_cpu=True, bf16=False, max_steps=4, report_to=[])",
        "TRL's SFTConfig trains in bf16 by default, which needs a GPU; a few steps suffice",
    ),
]

#: Path in the docs -> (fixture, what it stands for).
FIXTURE_PATHS: dict[str, tuple[str, str]] = {
    "path/to/llama": ("llama", "a Llama checkpoint folder"),
    "path/to/base-model": ("llama", "the base model a PEFT adapter was trained on"),
    "llama-7b/": ("llama", "a 7B Llama checkpoint folder"),
    "path/to/roberta-base": ("roberta", "RoBERTa-base"),
    "my-adapter": ("adapter", "an adapter of the Llama (where no earlier block saved one)"),
    "ad-a": ("adapter", "a second adapter of the Llama"),
    "ad-b": ("adapter", "a third adapter of the Llama"),
    "peft-unilora-adapter": ("peft", "a PEFT Uni-LoRA adapter of the Llama"),
}

#: (file, number of the block from 1, the block's first line) -> code run before it:
#: the names its prose leaves to the reader.
PROSE: dict[tuple[str, int, str], str] = {
    ("README.md", 3, "model.add_adapter("): (
        "model = get_unilora_model(fresh_llama(), UniLoRAConfig(rank=4, vector_length=4096))\n"
        "ids = token_ids(rows=3)"
    ),
    ("README.md", 5, "model = get_unilora_model("): "base = fresh_llama()",
    ("docs/TRAINING.md", 1, "import torch"): "loader = batches()",
    ("docs/TRAINING.md", 3, "import trl"): (
        "base = fresh_llama(layers=4)  # D = 65,536 for every linear layer at rank 4\n"
        "tokenizer = tiny_tokenizer()\n"
        "dataset = prompt_completion_rows()"
    ),
    ("docs/TRAINING.md", 4, "model = get_unilora_model(base, config_a)"): (
        "base = AutoModelForCausalLM.from_pretrained('path/to/llama')\n"
        "config_a = UniLoRAConfig(rank=4, vector_length=4096)\n"
        "save_adapter_of_llama('out/c')  # a third adapter, saved elsewhere"
    ),
    ("docs/TRAINING.md", 5, "model.eval()"): (
        "model = get_unilora_model(fresh_llama(), UniLoRAConfig(rank=4, vector_length=4096),"
        " adapter_name='a')\n"
        "model.add_adapter('b', UniLoRAConfig(rank=2, vector_length=2048, seed=7))\n"
        "input_ids = ids = token_ids(rows=4)\n"
        "mask = torch.ones_like(input_ids)"
    ),
    ("docs/TRAINING.md", 6, "bnb = transformers.BitsAndBytesConfig("): "import transformers",
    ("docs/TRAINING.md", 7, "import torch"): (
        "base = fresh_llama()\n"
        "import torch.distributed as dist\n"
        "single_process_group()  # what torchrun sets up, with one process"
    ),
    ("docs/GGUF.md", 1, "ur.export_gguf("): "import unilora_rs as ur",
}

#: (file, block number, first line) -> why the block cannot run here.
CANNOT_RUN: dict[tuple[str, int, str], str] = {}


def python_blocks(text: str) -> list[str]:
    """The ```python blocks of a Markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)


def _first_line(block: str) -> str:
    return block.strip().splitlines()[0]


# ---------------------------------------------------------------------------------------------
# The fixtures
# ---------------------------------------------------------------------------------------------

VOCAB = 64


def fresh_llama(seed: int = 0, layers: int = 3) -> Any:
    """A small Llama (hidden 256; 3 layers: D = 49,152 for every linear layer at rank 4,
    5,376 for q and v at rank 2) whose token ids are :func:`tiny_tokenizer`'s."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(cfg)


def fresh_roberta(seed: int = 0) -> Any:
    """A 2-layer RoBERTa (hidden 768): D = 24,576 for q and v at rank 4, above the
    documented d = 23,040."""
    torch.manual_seed(seed)
    cfg = transformers.RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=768,
        num_hidden_layers=2,
        num_attention_heads=12,
        intermediate_size=256,
        max_position_embeddings=40,
        pad_token_id=1,
    )
    return transformers.RobertaModel(cfg)


def tiny_tokenizer() -> Any:
    """A word-level tokenizer of :data:`VOCAB` tokens: ``<pad>``, ``<s>``, ``</s>``,
    ``<unk>`` (the Llama's pad, bos and eos ids) and the words ``w4`` ... ``w63``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<unk>", *(f"w{i}" for i in range(4, VOCAB))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>",
    )  # fmt: skip


def prompt_completion_rows(n: int = 8) -> Any:
    """A TRL dataset of ``prompt`` / ``completion`` rows in :func:`tiny_tokenizer`'s words."""
    datasets = pytest.importorskip("datasets")
    rows = [
        {"prompt": f"w{4 + i} w{5 + i} w{6 + i}", "completion": f" w{20 + i} w{21 + i}"}
        for i in range(n)
    ]
    return datasets.Dataset.from_list(rows)


def token_ids(rows: int = 2, length: int = 8) -> Any:
    return torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(0))


def batches(n: int = 2) -> list[dict[str, Any]]:
    """What a causal-LM data loader yields: ``input_ids`` and ``labels``."""
    return [{"input_ids": token_ids(), "labels": token_ids()} for _ in range(n)]


def save_adapter_of_llama(path: str | Path, seed: int = 0) -> Path:
    """A Uni-LoRA adapter of :func:`fresh_llama` (its checkpoint: ``path/to/llama``)."""
    from unilora_rs.torch import UniLoRAConfig, get_unilora_model

    model = get_unilora_model(fresh_llama(), UniLoRAConfig(rank=4, vector_length=4096, seed=seed))
    with torch.no_grad():
        model.theta_d.uniform_(-0.05, 0.05)
    model.save_pretrained(str(path))
    return Path(path)


def save_peft_adapter(path: Path, base: Path) -> Path:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = peft.UniLoraConfig(r=2, theta_d_length=512, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base), cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.uniform_(-0.05, 0.05)
    model.save_pretrained(str(path))
    return path


def make_fixture_paths(root: Path, text: str) -> None:
    """Writes, under ``root``, the fixture of each path of FIXTURE_PATHS that ``text``
    names (only those: a README block that saves ``my-adapter`` itself keeps doing so)."""
    llama = root / "fixtures" / "llama"
    if not llama.exists():
        fresh_llama().save_pretrained(str(llama))
    for path, (kind, _why) in FIXTURE_PATHS.items():
        target = root / path
        if f'"{path}"' not in text or target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if kind == "llama":
            target.symlink_to(llama, target_is_directory=True)
        elif kind == "roberta":
            fresh_roberta().save_pretrained(str(target))
        elif kind == "adapter":
            save_adapter_of_llama(target, seed=len(path))
        elif kind == "peft":
            save_peft_adapter(target, llama)


def single_process_group() -> None:
    """A one-process gloo group on this machine, as ``torchrun --nproc-per-node 1``
    would make (the FSDP2 block shards over it); destroyed after the file's blocks."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


@contextlib.contextmanager
def _in(folder: Path) -> Iterator[None]:
    old = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


@contextlib.contextmanager
def _restores_global_state() -> Iterator[None]:
    """What a block may change for the whole process: the Rust core's thread count
    (``ur.set_num_threads``) and torch.distributed's process group."""
    import torch.distributed as dist
    import unilora_rs as ur

    threads = ur.get_num_threads()
    try:
        yield
    finally:
        ur.set_num_threads(threads)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _prepared(block: str) -> str:
    for old, new, _why in SUBSTITUTIONS:
        block = block.replace(old, new)
    return block


def _lookup(table: dict[tuple[str, int, str], str], doc: str, number: int, block: str) -> str:
    for (d, n, first), value in table.items():
        if d == doc and n == number:
            assert _first_line(block).startswith(first), (
                f"{doc} block {number} now starts {_first_line(block)!r}, not {first!r}: "
                "update the tables of tests/test_docs.py"
            )
            return value
    return ""


def test_tables_name_existing_blocks() -> None:
    blocks = {doc: python_blocks((ROOT / doc).read_text(encoding="utf-8")) for doc in DOCS}
    for table in (PROSE, CANNOT_RUN):
        for doc, number, first in table:
            assert 1 <= number <= len(blocks[doc]), (doc, number)
            assert _first_line(blocks[doc][number - 1]).startswith(first), (doc, number)
    for old, _new, _why in SUBSTITUTIONS:
        assert any(old in b for bs in blocks.values() for b in bs), old


@pytest.mark.parametrize("doc", [d for d in DOCS if "```python" in (ROOT / d).read_text()])
def test_python_blocks_run(doc: str, tmp_path: Path) -> None:
    blocks = python_blocks((ROOT / doc).read_text(encoding="utf-8"))
    namespace: dict[str, Any] = {
        "__name__": f"docs:{doc}",
        "torch": torch,
        "fresh_llama": fresh_llama,
        "token_ids": token_ids,
        "batches": batches,
        "save_adapter_of_llama": save_adapter_of_llama,
        "tiny_tokenizer": tiny_tokenizer,
        "prompt_completion_rows": prompt_completion_rows,
        "single_process_group": single_process_group,
    }
    with _in(tmp_path), warnings.catch_warnings(), _restores_global_state():
        warnings.simplefilter("ignore")  # the docs' code, not the test, decides on warnings
        for number, block in enumerate(blocks, start=1):
            if _lookup(CANNOT_RUN, doc, number, block):
                continue
            code = _prepared(block)
            setup = _lookup(PROSE, doc, number, block)
            make_fixture_paths(tmp_path, setup + code)
            if setup:
                if "UniLoRAConfig" in setup or "get_unilora_model" in setup:
                    exec("from unilora_rs.torch import UniLoRAConfig, get_unilora_model", namespace)
                exec(compile(setup, f"{doc}: prose before block {number}", "exec"), namespace)
            try:
                exec(compile(code, f"{doc}: block {number}", "exec"), namespace)
            except Exception as err:
                raise AssertionError(f"{doc}, block {number} failed: {err!r}\n{code}") from err
