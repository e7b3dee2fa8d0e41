"""``unilora demo``'s folder: every option is checked before the folder is touched, and
a later run replaces only what the demo wrote (a user's files are kept)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from unilora_rs.cli import main
from unilora_rs.demo import workdir
from unilora_rs.demo.workdir import DEMO_MARKER, prepare_out

pytest.importorskip("torch")


def earlier_run(out: Path) -> None:
    """A folder as a finished demo run leaves it, plus a file of the user's."""
    out.mkdir()
    written = ["adapter", "demo.json", "lora", "merged"]
    marker = {"created_by": "unilora demo", "kept": [], "written": written}
    (out / DEMO_MARKER).write_text(json.dumps(marker))
    for name in ("adapter", "merged", "lora"):
        (out / name).mkdir()
        (out / name / "f.bin").write_bytes(b"x")
    (out / "demo.json").write_text("{}")
    (out / "notes.txt").write_text("mine")


def listing(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*")}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--train-examples", "5000"], "at most 3000 training"),
        (["--eval-examples", "9"], "at least 10"),
        (["--lr", "-1"], "lr must be a positive number"),
        (["--epochs", "0"], "epochs must be at least 1"),
        (["llm", "--lr", "-1"], "lr must be a positive number"),
    ],
)
def test_bad_options_leave_the_earlier_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    """They deleted the earlier run's adapter/, merged/, lora/ and demo.json first."""
    out = tmp_path / "demo"
    earlier_run(out)
    before = listing(out)
    which = argv[:1] if argv[0] == "llm" else []
    assert main(["demo", *which, "--out", str(out), *argv[len(which) :]]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert listing(out) == before


def test_a_later_run_replaces_only_what_the_demo_wrote(tmp_path: Path) -> None:
    """A user's file placed in the folder was deleted without a word."""
    out = tmp_path / "demo"
    earlier_run(out)
    prepare_out(out)
    assert listing(out) == {DEMO_MARKER, "notes.txt"}
    assert (out / "notes.txt").read_text() == "mine"
    (out / "adapter").mkdir()
    workdir.record_written(out)
    marker = json.loads((out / DEMO_MARKER).read_text())
    assert marker["kept"] == ["notes.txt"] and marker["written"] == ["adapter"]


@pytest.mark.parametrize("which", ["classifier", "llm"])
def test_a_users_file_the_demo_would_write_is_refused_first(tmp_path: Path, which: str) -> None:
    """A user's model.onnx in the folder stopped the classifier demo at its ONNX step,
    after training; now the run is refused before anything in the folder changes."""
    from unilora_rs.demo import classifier, llm

    writes = {"classifier": classifier.WRITES, "llm": llm.WRITES}[which]
    name = {"classifier": "model.onnx", "llm": "adapter.gguf"}[which]
    out = tmp_path / "demo"
    earlier_run(out)
    (out / name).write_text("mine")
    before = listing(out)
    with pytest.raises(FileExistsError, match=f"writes {name} in its folder"):
        prepare_out(out, writes)
    assert listing(out) == before and (out / name).read_text() == "mine"
    (out / name).unlink()
    prepare_out(out, writes)
    assert listing(out) == {DEMO_MARKER, "notes.txt"}


def test_an_interrupted_run_is_cleaned_with_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="no earlier demo run"):
        prepare_out(out)
    (out / "notes.txt").unlink()
    prepare_out(out)
    (out / "notes.txt").write_text("mine")  # the user's, before the run was killed
    json.loads((out / DEMO_MARKER).read_text())  # no "written": the run did not finish
    marker = json.loads((out / DEMO_MARKER).read_text())
    marker["kept"] = ["notes.txt"]
    (out / DEMO_MARKER).write_text(json.dumps(marker))
    (out / "adapter").mkdir()
    capsys.readouterr()
    prepare_out(out)
    assert "removing what an interrupted demo run left" in capsys.readouterr().err
    assert listing(out) == {DEMO_MARKER, "notes.txt"}


def test_a_tampered_marker_never_removes_outside_the_folder(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    prepare_out(out)
    (tmp_path / "outside").write_text("keep")
    marker = {"created_by": "unilora demo", "kept": [], "written": ["../outside", "..", "/etc"]}
    (out / DEMO_MARKER).write_text(json.dumps(marker))
    prepare_out(out)
    assert (tmp_path / "outside").read_text() == "keep"
