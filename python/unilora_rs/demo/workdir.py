"""The demo's work folder, marked by a file that records what the demo wrote there:
a later run replaces only that, and every other file (a user's) is kept."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path
from typing import Any

__all__ = ["DEMO_MARKER", "dir_bytes", "prepare_out", "record_written", "write_csv"]

DEMO_MARKER = "unilora-demo.json"


def _entries(out: Path) -> set[str]:
    return {p.name for p in out.iterdir()} if out.is_dir() else set()


def _read_marker(out: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((out / DEMO_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("created_by") != "unilora demo":
        return None
    return marker


def _names(value: object) -> list[str]:
    """The plain entry names of a marker list (anything else is ignored: the marker
    never removes outside its folder)."""
    if not isinstance(value, list):
        return []
    return [
        n for n in value if isinstance(n, str) and n not in ("", ".", "..") and Path(n).name == n
    ]


def _write_marker(out: Path, marker: dict[str, Any]) -> None:
    (out / DEMO_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def prepare_out(out: Path, writes: tuple[str, ...] = ()) -> None:
    """Makes ``out`` the demo's folder. A folder that is not empty and holds no demo
    marker is refused; in an earlier demo's folder, what that run wrote (the marker's
    ``written`` list) is removed and everything else is kept, unless it has a name in
    ``writes`` (what this run will write there): that is refused before anything
    changes, as the demo would otherwise stop at that step or replace the user's file.
    After an interrupted run (no ``written`` list) what was not there before it is
    removed, with a note."""
    names = _entries(out)
    marker = _read_marker(out) if DEMO_MARKER in names else None
    if names and marker is None:
        raise FileExistsError(
            17, "demo folder exists, is not empty and is no earlier demo run", str(out)
        )
    if marker is not None:
        if "written" in marker:
            written = _names(marker["written"])
        else:
            written = sorted(names - set(_names(marker.get("kept"))) - {DEMO_MARKER})
        clash = sorted(set(writes) & (names - set(written) - {DEMO_MARKER}))
        if clash:
            raise FileExistsError(
                17,
                f"the demo writes {', '.join(clash)} in its folder, and the one there is "
                "not from an earlier demo run (move it, or give another --out)",
                str(out / clash[0]),
            )
        if written and "written" not in marker:
            print(
                f"unilora: note: removing what an interrupted demo run left in {out}: "
                f"{', '.join(written)}",
                file=sys.stderr,
            )
        for name in written:
            _remove(out / name)
    out.mkdir(parents=True, exist_ok=True)
    kept = sorted(_entries(out) - {DEMO_MARKER})
    _write_marker(out, {"created_by": "unilora demo", "kept": kept})


def record_written(out: Path) -> None:
    """Records in the marker what the run that :func:`prepare_out` started wrote into
    ``out`` (everything but the files it kept); a finished record is left alone."""
    marker = _read_marker(out) if out.is_dir() else None
    if marker is None or "written" in marker:
        return
    kept = set(_names(marker.get("kept")))
    marker["written"] = sorted(_entries(out) - kept - {DEMO_MARKER})
    _write_marker(out, marker)


def write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    """``rows`` (``text``, ``label``) as a CSV file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)


def dir_bytes(path: Path) -> int:
    """Bytes of every file below ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
