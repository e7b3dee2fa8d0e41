"""The options several ``unilora`` commands share, each defined once.

A command adds one with ``add_<option>(parser, ...)``: the flag, its action and its
name on ``args`` are fixed here; the help text may name what the command replaces or
shows. This module is no command (``cli.py`` registers the public modules only).

>>> import argparse
>>> p = argparse.ArgumentParser(prog="unilora export-lora")
>>> add_overwrite(p)
>>> add_no_progress(p)
>>> p.parse_args(["--overwrite"])
Namespace(overwrite=True, no_progress=False)
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = [
    "DTYPES",
    "add_adapter",
    "add_dtype",
    "add_no_progress",
    "add_overwrite",
    "add_saved_modules",
]

#: The ``--dtype`` values of the commands that write tensors.
DTYPES = ("bf16", "f16", "f32")


def add_adapter(parser: argparse.ArgumentParser, help: str = "the Uni-LoRA adapter folder") -> None:
    """The positional ``adapter`` (``args.adapter``): the adapter folder to read."""
    parser.add_argument("adapter", help=help)


def add_overwrite(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """``--overwrite`` (``args.overwrite``). Without ``help``, the rule of the commands
    that write a folder: it is replaced only when empty or an earlier output of the
    same command (named by ``parser.prog``, e.g. ``unilora export-lora``)."""
    if help is None:
        command = parser.prog.rsplit(" ", 1)[-1]
        help = f"replace an existing output (only if empty or an earlier {command} output)"
    parser.add_argument("--overwrite", action="store_true", help=help)


def add_no_progress(
    parser: argparse.ArgumentParser, help: str = "do not show a progress bar"
) -> None:
    """``--no-progress`` (``args.no_progress``): progress is shown unless given."""
    parser.add_argument("--no-progress", action="store_true", help=help)


def add_dtype(parser: argparse.ArgumentParser, *, default: str | None, help: str) -> None:
    """``--dtype`` (``args.dtype``), one of :data:`DTYPES`."""
    parser.add_argument("--dtype", choices=DTYPES, default=default, help=help)


def add_saved_modules(
    parser: argparse.ArgumentParser, *, choices: Sequence[str], help: str
) -> None:
    """``--saved-modules`` (``args.saved_modules``): what an export does with the
    adapter's ``modules_to_save`` tensors; ``"error"`` by default."""
    parser.add_argument("--saved-modules", choices=choices, default="error", help=help)
