"""One validator for adapter folders: the CLI, ``load_adapter``, ``inspect``, ``merge``,
``export_lora`` and ``UniLoRAModel.from_pretrained`` accept and reject the same files,
with the same error."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import reference as ref  # noqa: E402
import unilora_rs as ur  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402
from tiny_models import tiny_llama  # noqa: E402
from unilora_rs import _core  # noqa: E402
from unilora_rs.adapter import CONFIG_NAME, WEIGHTS_NAME, AdapterConfig, ModuleSpec  # noqa: E402
from unilora_rs.cli import main  # noqa: E402
from unilora_rs.torch import UniLoRAConfig, UniLoRAModel, get_unilora_model  # noqa: E402

D = 256


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A valid adapter (q, v of a tiny Llama) and the base model folder it fits."""
    root = tmp_path_factory.mktemp("good")
    model = get_unilora_model(
        tiny_llama(), UniLoRAConfig(rank=4, vector_length=D, target_modules=["q_proj", "v_proj"])
    )
    model.save_pretrained(root / "adapter")
    tiny_llama().save_pretrained(root / "base")
    return root / "adapter", root / "base"


def _fingerprint(cfg: dict[str, Any]) -> str:
    """The fingerprint of the config's modules, from the reference's text: a module name
    with a control character (which ``ur.fingerprint`` refuses) gets one too, so that
    the name is the only fault of such a case."""
    r = cfg["rank"]
    named: list[tuple[str, int, int]] = []
    for m in cfg["modules"]:
        named.append((f"{m['name']}.lora_B", m["out_features"], r))
        named.append((f"{m['name']}.lora_A", r, m["in_features"]))
    return ref.fingerprint(cfg["seed"], cfg["vector_length"], named)


def _set(key: str, value: Any, *, refresh: bool = False) -> Callable[[dict[str, Any]], None]:
    def edit(cfg: dict[str, Any]) -> None:
        cfg[key] = value
        if refresh:
            cfg["fingerprint"] = _fingerprint(cfg)

    return edit


def _module(key: str, value: Any, *, refresh: bool = False) -> Callable[[dict[str, Any]], None]:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["modules"][0][key] = value
        if refresh:
            cfg["fingerprint"] = _fingerprint(cfg)

    return edit


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda cfg: cfg.pop(key)


#: The config of a PEFT Uni-LoRA adapter (as PEFT 0.21 saves it).
PEFT_UNILORA = {
    "peft_type": "UNILORA",
    "r": 4,
    "theta_d_length": D,
    "proj_seed": 0,
    "target_modules": ["q_proj", "v_proj"],
    "base_model_name_or_path": "base",
}


def _replace(cfg: dict[str, Any], new: dict[str, Any]) -> None:
    cfg.clear()
    cfg.update(new)


# Each case: an edit of the good config (or a raw replacement of its text), the error
# class every path must raise, and a part of the message.
CASES: dict[str, tuple[Callable[[dict[str, Any]], None] | tuple[str, str], type, str]] = {
    "alpha Infinity": (('"alpha": 4.0', '"alpha": Infinity'), ur.FormatError, "not finite"),
    "alpha NaN": (('"alpha": 4.0', '"alpha": NaN'), ur.FormatError, "not finite"),
    "alpha -Infinity": (('"alpha": 4.0', '"alpha": -Infinity'), ur.FormatError, "not finite"),
    "alpha 1e400": (('"alpha": 4.0', '"alpha": 1e400'), ur.FormatError, "alpha"),
    "alpha string": (_set("alpha", "4"), ur.FormatError, "alpha must be a finite number"),
    "alpha null": (_set("alpha", None), ur.FormatError, "alpha must be a finite number"),
    "missing fingerprint": (_drop("fingerprint"), ur.FormatError, "no fingerprint"),
    "empty fingerprint": (_set("fingerprint", ""), ur.FormatError, "no fingerprint"),
    "extra key in a module": (_module("bias", True), ur.FormatError, 'unknown key "bias"'),
    "rank larger than the layer": (
        _set("rank", 20, refresh=True),
        ur.FormatError,
        "rank 20 is larger than module",
    ),
    "huge rank": (_set("rank", 10**12, refresh=True), ur.FormatError, "rank 1000000000000"),
    "rank 0": (_set("rank", 0), ur.FormatError, "rank must be"),
    "rank string": (_set("rank", "4"), ur.FormatError, "rank must be"),
    "in_features beyond u64": (_module("in_features", 2**64 + 5), ur.FormatError, "in_features"),
    "in_features float": (_module("in_features", 32.5), ur.FormatError, "in_features"),
    "in_features bool": (_module("in_features", True), ur.FormatError, "in_features"),
    "name with a tab": (
        _module("name", "model.layers.0.self_attn.q_proj\tx", refresh=True),
        ur.FormatError,
        "control character",
    ),
    "name with a newline": (
        _module("name", "model.layers.0\nself_attn.q_proj", refresh=True),
        ur.FormatError,
        "control character",
    ),
    "empty name": (_module("name", "", refresh=True), ur.FormatError, "name"),
    "kind": (_module("kind", "Linear", refresh=True), ur.FormatError, 'kind "Linear"'),
    "seed negative": (_set("seed", -1), ur.FormatError, "seed"),
    "seed beyond u64": (_set("seed", 2**64), ur.FormatError, "seed"),
    "format_version string": (_set("format_version", "1"), ur.FormatError, "format_version"),
    "format_version newer": (_set("format_version", 2), ur.FormatError, "newer"),
    "spec_version missing": (_drop("spec_version"), ur.FormatError, "spec_version"),
    "init_range negative": (_set("init_range", -1.0), ur.FormatError, "init_range"),
    "target_modules number": (_set("target_modules", 5), ur.FormatError, "target_modules"),
    "modules_to_save string": (
        _set("modules_to_save", "lm_head"),
        ur.FormatError,
        "modules_to_save",
    ),
    "base model number": (_set("base_model_name_or_path", 5), ur.FormatError, "base_model"),
    "modules empty": (_set("modules", []), ur.FormatError, "at least one module"),
    "module not an object": (_set("modules", ["q_proj"]), ur.FormatError, "modules"),
    "duplicate module": (
        lambda cfg: cfg["modules"].append(dict(cfg["modules"][0])),
        ur.FormatError,
        "listed twice",
    ),
    "not an object": (lambda cfg: cfg.clear(), ur.FormatError, "not a unilora_rs adapter"),
    "a PEFT Uni-LoRA adapter": (
        lambda cfg: _replace(cfg, PEFT_UNILORA),
        ur.FormatError,
        'a PEFT Uni-LoRA adapter (peft_type "UNILORA"), not a unilora_rs one: convert it '
        "with `unilora convert-peft",
    ),
    "a PEFT LoRA adapter": (
        lambda cfg: _replace(cfg, {**PEFT_UNILORA, "peft_type": "LORA"}),
        ur.FormatError,
        'a PEFT adapter (peft_type "LORA"), not a unilora_rs adapter',
    ),
    "fingerprint tampered": (_set("seed", 5), ur.MismatchError, "fingerprint mismatch"),
}


def _write_case(src: Path, dst: Path, edit: Any) -> None:
    shutil.copytree(src, dst)
    path = dst / CONFIG_NAME
    if isinstance(edit, tuple):
        old, new = edit
        text = path.read_text()
        assert old in text
        path.write_text(text.replace(old, new))
    else:
        cfg = json.loads(path.read_text())
        edit(cfg)
        path.write_text(json.dumps(cfg))


def _outcome(fn: Callable[[], object]) -> tuple[type, str] | None:
    try:
        fn()
    except Exception as err:
        return type(err), str(err)
    return None


def _paths(adapter: Path, base: Path, out: Path) -> dict[str, Callable[[], object]]:
    return {
        "load_adapter": lambda: ur.load_adapter(adapter),
        "load_adapter_config": lambda: ur.load_adapter_config(adapter),
        "inspect": lambda: ur.inspect(adapter),
        "merge": lambda: ur.merge(base, adapter, out / "merged"),
        "export_lora": lambda: ur.export_lora(adapter, out / "lora"),
        "from_pretrained": lambda: UniLoRAModel.from_pretrained(tiny_llama(), adapter),
    }


def test_the_good_adapter_passes_every_path(good: tuple[Path, Path], tmp_path: Path) -> None:
    adapter, base = good
    for name, fn in _paths(adapter, base, tmp_path).items():
        assert _outcome(fn) is None, name
    assert main(["inspect", str(adapter)]) == 0


@pytest.mark.parametrize("case", list(CASES))
def test_every_path_rejects_alike(
    case: str, good: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter, base = good
    edit, exc, message = CASES[case]
    bad = tmp_path / "bad"
    _write_case(adapter, bad, edit)
    outcomes = {name: _outcome(fn) for name, fn in _paths(bad, base, tmp_path).items()}
    if exc is ur.MismatchError:
        # inspect reports a fingerprint mismatch instead of raising it
        assert not ur.inspect(bad).fingerprint_ok
        del outcomes["inspect"]
    for name, got in outcomes.items():
        assert got is not None, f"{name} accepted {case}"
        assert got[0] is exc, f"{name}: {got}"
        assert message in got[1], f"{name}: {got[1]}"
    assert len({got for got in outcomes.values()}) == 1, outcomes  # the same error everywhere
    capsys.readouterr()
    assert main(["inspect", str(bad)]) == 1
    if exc is not ur.MismatchError:
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("unilora: error:") and message in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # nothing written


def test_other_top_level_keys_are_accepted_everywhere(
    good: tuple[Path, Path], tmp_path: Path
) -> None:
    adapter, base = good
    extra = tmp_path / "extra"
    _write_case(adapter, extra, _set("notes", {"by": "a user", "runs": [1, 2]}))
    for name, fn in _paths(extra, base, tmp_path).items():
        assert _outcome(fn) is None, name
    checked = _core.read_adapter_config(extra)
    assert checked["notes"] == {"by": "a user", "runs": [1, 2]}


def test_task_entry_is_checked_and_normalised(good: tuple[Path, Path], tmp_path: Path) -> None:
    adapter, base = good
    task = tmp_path / "task"
    _write_case(adapter, task, _set("task", {"type": "causal-lm", "new_tensors": []}))
    for name, fn in _paths(task, base, tmp_path).items():
        assert _outcome(fn) is None, name
    checked = _core.read_adapter_config(task)
    assert checked["task"] == {"type": "causal-lm", "config": {}, "new_tensors": []}
    bad = tmp_path / "bad"
    _write_case(adapter, bad, _set("task", {"type": "causal-lm", "extra": 1}))
    with pytest.raises(ur.FormatError, match="task: unknown key"):
        _core.read_adapter_config(bad)


@pytest.mark.parametrize("peft_type", ["UNILORA", "LORA"])
def test_merging_a_peft_adapter_names_it_and_convert_peft(
    peft_type: str, good: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``unilora merge`` of a PEFT adapter said ``format = nothing (the key is missing)``."""
    adapter, base = good
    bad = tmp_path / "peft"
    _write_case(adapter, bad, lambda cfg: _replace(cfg, {**PEFT_UNILORA, "peft_type": peft_type}))
    capsys.readouterr()
    assert main(["merge", str(base), str(bad), str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("unilora: error:"), err
    assert "the key is missing" not in err and "unilora convert-peft" in err, err
    assert f"PEFT {'Uni-LoRA ' if peft_type == 'UNILORA' else ''}adapter" in err, err
    assert not (tmp_path / "out").exists()


def test_programmatic_configs_use_the_same_rules() -> None:
    mods = [ModuleSpec("a", 16, 8)]
    with pytest.raises(ur.InvalidArgumentError, match="alpha"):
        AdapterConfig(seed=0, vector_length=8, rank=4, alpha=float("inf"), modules=mods)
    with pytest.raises(ur.InvalidArgumentError, match="alpha"):
        AdapterConfig(seed=0, vector_length=8, rank=4, alpha=float("nan"), modules=mods)
    with pytest.raises(ur.InvalidArgumentError, match="rank 9 is larger than module"):
        AdapterConfig(seed=0, vector_length=8, rank=9, alpha=9.0, modules=mods)
    with pytest.raises(ur.InvalidArgumentError, match="in_features"):
        ModuleSpec("a", 2**64 + 5, 8)
    with pytest.raises(ur.InvalidArgumentError, match="control character"):
        ModuleSpec("a\tb", 16, 8)
    with pytest.raises(ur.InvalidArgumentError, match="control character"):
        ModuleSpec("x\ny", 4, 4)
    cfg = AdapterConfig(seed=3, vector_length=8, rank=4, alpha=4.0, modules=mods)
    assert cfg.fingerprint == cfg.expected_fingerprint()
    assert cfg.fingerprint == ur.fingerprint(3, 8, {"a.lora_B": (8, 4), "a.lora_A": (4, 16)})


def test_golden_adapter_fingerprint() -> None:
    """The fingerprint of adapters is frozen (spec v1): a fixed module list gives this."""
    mods = [ModuleSpec("model.layers.0.self_attn.q_proj", 4096, 4096), ModuleSpec("lm", 8, 3)]
    cfg = AdapterConfig(seed=42, vector_length=1000, rank=2, alpha=2.0, modules=mods)
    text = (
        "unilora-spec-v1\nseed=42\nd=1000\n"
        "model.layers.0.self_attn.q_proj.lora_B\t4096\t2\n"
        "model.layers.0.self_attn.q_proj.lora_A\t2\t4096\n"
        "lm.lora_B\t3\t2\nlm.lora_A\t2\t8\n"
    )
    assert cfg.fingerprint == "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    assert cfg.fingerprint == (
        "sha256:418dbaff816bcc76e2c6ba0f7fa3b6458d915530b05b45d2ec2f1f74795b2a12"
    )


# ---------------------------------------------------------------- the weights file


def _paths_weights(adapter: Path, base: Path, out: Path) -> dict[str, Callable[[], object]]:
    paths = _paths(adapter, base, out)
    del paths["load_adapter_config"]  # reads the config only
    return paths


def _rewrite_weights(adapter: Path, tensors: dict[str, np.ndarray], meta: dict[str, str]) -> None:
    save_file(tensors, str(adapter / WEIGHTS_NAME), metadata=meta)


def test_weights_of_another_adapter_are_refused(good: tuple[Path, Path], tmp_path: Path) -> None:
    adapter, base = good
    other = tmp_path / "other"
    get_unilora_model(
        tiny_llama(), UniLoRAConfig(rank=4, vector_length=D, target_modules=["k_proj", "o_proj"])
    ).save_pretrained(other)
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    shutil.copy(other / WEIGHTS_NAME, bad / WEIGHTS_NAME)  # same d, another adapter
    for name, fn in _paths_weights(bad, base, tmp_path).items():
        got = _outcome(fn)
        assert got is not None and got[0] is ur.MismatchError, f"{name}: {got}"
        assert "belongs to another adapter" in got[1], f"{name}: {got[1]}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "other"]


def test_weights_without_fingerprint_metadata_are_read(
    good: tuple[Path, Path], tmp_path: Path
) -> None:
    adapter, base = good
    ok = tmp_path / "ok"
    shutil.copytree(adapter, ok)
    tensors = load_file(str(ok / WEIGHTS_NAME))
    _rewrite_weights(ok, tensors, {})
    for name, fn in _paths_weights(ok, base, tmp_path).items():
        assert _outcome(fn) is None, name


def test_tensor_outside_modules_to_save_is_refused(good: tuple[Path, Path], tmp_path: Path) -> None:
    adapter, base = good
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    tensors = load_file(str(bad / WEIGHTS_NAME))
    tensors["lm_head.weight"] = np.zeros((64, 32), dtype=np.float32)
    fp = json.loads((bad / CONFIG_NAME).read_text())["fingerprint"]
    _rewrite_weights(bad, tensors, {"format": "unilora_rs", "fingerprint": fp})
    for name, fn in _paths_weights(bad, base, tmp_path).items():
        got = _outcome(fn)
        assert got is not None and got[0] is ur.FormatError, f"{name}: {got}"
        assert '"lm_head.weight" is not part of modules_to_save' in got[1], f"{name}: {got[1]}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


# ---------------------------------------------------------------- special files


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_readers_open_only_regular_files(good: tuple[Path, Path], tmp_path: Path) -> None:
    adapter, base = good
    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)
    results: list[object] = []

    def call(fn: Callable[[], object]) -> None:
        results.append(_outcome(fn))

    def run(fn: Callable[[], object], pipe: Path) -> tuple[type, str] | None:
        results.clear()
        t = threading.Thread(target=call, args=(fn,), daemon=True)
        t.start()
        t.join(20)
        if t.is_alive():  # unblock the reader, then fail
            with open(pipe, "wb"):
                pass
            t.join(5)
            pytest.fail(f"{fn} blocked on a FIFO")
        return results[0]  # type: ignore[return-value]

    got = run(lambda: _core.safetensors_header(fifo), fifo)
    assert got is not None and issubclass(got[0], OSError) and "not a regular file" in got[1]
    got = run(lambda: ur.merge(fifo, adapter, tmp_path / "out.safetensors"), fifo)
    assert got is not None and issubclass(got[0], OSError) and "not a regular file" in got[1]

    fifo_adapter = tmp_path / "fifo-adapter"
    shutil.copytree(adapter, fifo_adapter)
    (fifo_adapter / CONFIG_NAME).unlink()
    os.mkfifo(fifo_adapter / CONFIG_NAME)
    for name, fn in _paths(fifo_adapter, base, tmp_path).items():
        got = run(fn, fifo_adapter / CONFIG_NAME)
        assert got is not None and issubclass(got[0], OSError), f"{name}: {got}"
        assert "not a regular file" in got[1], f"{name}: {got[1]}"
