"""The demos' own options (the training options are :class:`~unilora_rs.train_options.
FinetuneArgs`); each field is also a ``unilora demo`` flag. No torch here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..flags import flag

__all__ = ["ClassifierDemoArgs"]

_DEMO = ("demo",)


@dataclass
class ClassifierDemoArgs:
    """Options of the classifier demo (``unilora demo``)."""

    out: Path = flag(Path("unilora-demo"), "work folder", commands=_DEMO, type=Path)
    train_examples: int = flag(3000, "training sentences", commands=_DEMO, type=int)
    eval_examples: int = flag(2000, "held-out sentences", commands=_DEMO, type=int)
    baseline_lr: float | None = flag(
        None, "lr of the head-only baseline", commands=_DEMO, type=float
    )
    onnx: bool = flag(True, "skip the ONNX export", commands=_DEMO, negative="--no-onnx")
