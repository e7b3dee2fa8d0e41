"""Command-line flags generated from option dataclasses (unilora_rs.flags)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest
from unilora_rs.errors import InvalidArgumentError
from unilora_rs.flags import add_flags, flag, given_flags
from unilora_rs.train_options import FinetuneArgs, parse_targets

_BOTH = ("one", "two")


@dataclass
class _Opts:
    size: int = flag(3, "a size", type=int, commands=_BOTH)
    name: str = flag("x", "a name", commands=("one",))
    fast: bool = flag(False, "go fast", commands=_BOTH)
    bar: bool = flag(True, "no bar", negative="--no-bar", commands=_BOTH)
    path: Path | None = flag(None, "a path", type=Path, commands=("two",))
    targets: list[str] | str | None = flag(None, "targets", convert=parse_targets, commands=_BOTH)
    hidden: int = 7


def _parse(command: str, *argv: str) -> dict[str, object]:
    p = argparse.ArgumentParser()
    add_flags(p, _Opts, command)
    return given_flags(p.parse_args(list(argv)), _Opts, command)


def test_only_given_flags_are_returned_and_defaults_stay() -> None:
    assert _parse("one") == {}
    assert _Opts(**_parse("one")) == _Opts()


def test_types_booleans_and_conversion() -> None:
    got = _parse("two", "--size", "5", "--fast", "--no-bar", "--path", "a/b", "--targets", "q,v")
    assert got == {
        "size": 5,
        "fast": True,
        "bar": False,
        "path": Path("a/b"),
        "targets": ["q", "v"],
    }


def test_flags_belong_to_their_commands() -> None:
    p = argparse.ArgumentParser()
    add_flags(p, _Opts, "one")
    with pytest.raises(SystemExit):
        p.parse_args(["--path", "x"])  # a flag of "two" only
    with pytest.raises(SystemExit):
        p.parse_args(["--hidden", "1"])  # not a flag at all


def test_conversion_errors_are_one_line_errors_not_usage_errors() -> None:
    with pytest.raises(InvalidArgumentError, match="--target-modules is empty"):
        _parse("one", "--targets", " ")


def test_every_train_flag_sets_its_field() -> None:
    """`unilora train`'s flags are exactly FinetuneArgs' flagged fields."""
    p = argparse.ArgumentParser()
    add_flags(p, FinetuneArgs, "train")
    dests = {a.dest for a in p._actions if a.dest != "help"}
    flagged = {f.name for f in dataclasses.fields(FinetuneArgs) if "flag" in f.metadata}
    assert dests == flagged
    assert {"model", "data", "lr", "rank", "progress"} <= dests
