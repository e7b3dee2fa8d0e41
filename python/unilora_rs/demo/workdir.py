"""The demo's work folder: created with a marker file, replaced only when the marker
says an earlier demo wrote it."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

__all__ = ["DEMO_MARKER", "dir_bytes", "prepare_out", "write_csv"]

DEMO_MARKER = "unilora-demo.json"


def prepare_out(out: Path) -> None:
    """Makes ``out`` an empty demo folder; an earlier demo run there is replaced, any
    other non-empty folder is refused."""
    if out.exists() and any(out.iterdir()):
        if not (out / DEMO_MARKER).is_file():
            raise FileExistsError(
                17, "demo folder exists, is not empty and is no earlier demo run", str(out)
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text(json.dumps({"created_by": "unilora demo"}) + "\n")


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
