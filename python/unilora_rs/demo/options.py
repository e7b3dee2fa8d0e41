"""The demos' own options (the training options are :class:`~unilora_rs.train_options.
FinetuneArgs`); each field is also a ``unilora demo`` flag. No torch here."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import InvalidArgumentError
from ..flags import flag

__all__ = ["DEMOS", "DemoArgs"]

_DEMO = ("demo",)

#: The demos: ``classifier`` (the default) and ``llm``.
DEMOS = ("classifier", "llm")

#: Defaults that differ between the demos (fields left at ``None``).
_DEFAULTS: dict[str, dict[str, object]] = {
    "classifier": {"out": Path("unilora-demo"), "train_examples": 3000, "eval_examples": 2000},
    "llm": {"out": Path("unilora-demo-llm"), "train_examples": 240, "eval_examples": 500},
}


@dataclass
class DemoArgs:
    """Options of ``unilora demo`` (both demos)."""

    out: Path | None = flag(
        None, "work folder (default unilora-demo, unilora-demo-llm)", commands=_DEMO, type=Path
    )
    train_examples: int | None = flag(
        None, "training examples (default 3000; llm 240)", commands=_DEMO, type=int
    )
    eval_examples: int | None = flag(
        None, "held-out examples (default 2000; llm 500)", commands=_DEMO, type=int
    )
    baseline_lr: float | None = flag(
        None, "classifier: lr of the head-only baseline", commands=_DEMO, type=float
    )
    onnx: bool = flag(
        True, "classifier: skip the ONNX export", commands=_DEMO, negative="--no-onnx"
    )

    def for_demo(self, which: str) -> DemoArgs:
        """A copy with ``which`` demo's defaults filled in (options of the other demo
        are refused)."""
        if which not in DEMOS:
            raise InvalidArgumentError(f"demo {which!r} is not one of {', '.join(DEMOS)}")
        if which == "llm" and (self.baseline_lr is not None or not self.onnx):
            raise InvalidArgumentError("--baseline-lr and --no-onnx are classifier demo options")
        fill = {k: v for k, v in _DEFAULTS[which].items() if getattr(self, k) is None}
        return replace(self, **fill)  # type: ignore[arg-type]
