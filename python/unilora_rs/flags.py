"""Command-line flags generated from the option dataclass that holds them.

A dataclass field declared with :func:`flag` carries its help text, the commands that
offer it and how its value is parsed; :func:`add_flags` builds a command's arguments
from these declarations and :func:`given_flags` reads back what the user gave, so each
flag is written once, beside the option it sets (``unilora train``'s flags are the
fields of :class:`~unilora_rs.train_options.FinetuneArgs`). No torch here: parsers are
built for every command.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Flag", "add_flags", "flag", "given_flags"]


@dataclass(frozen=True)
class Flag:
    """How one option field appears on the command line."""

    help: str
    commands: tuple[str, ...] = ("train", "demo")
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    required: bool = False
    #: For a boolean field whose default is True: the flag that turns it off.
    negative: str | None = None
    #: Show the field's default in the help text.
    show_default: bool = True
    #: Applied to the given string after parsing (its errors are one-line errors of the
    #: command, not usage errors).
    convert: Callable[[str], Any] | None = None


def flag(default: Any, help: str, **how: Any) -> Any:
    """A dataclass field with ``default`` that is also a command-line flag (see
    :class:`Flag` for ``how``)."""
    return dataclasses.field(default=default, metadata={"flag": Flag(help, **how)})


def _flag_of(field: dataclasses.Field[Any]) -> Flag | None:
    return field.metadata.get("flag")


def _add_one(parser: argparse.ArgumentParser, field: dataclasses.Field[Any], how: Flag) -> None:
    help_text = how.help
    if how.show_default and field.default is not None and not isinstance(field.default, bool):
        help_text += f" (default {field.default})"
    if field.type in (bool, "bool"):
        if how.negative:
            parser.add_argument(how.negative, dest=field.name, action="store_false", help=help_text)
        else:
            parser.add_argument(
                "--" + field.name.replace("_", "-"),
                action="store_true",
                help=help_text,
            )
        parser.set_defaults(**{field.name: None})
        return
    parser.add_argument(
        "--" + field.name.replace("_", "-"),
        dest=field.name,
        type=how.type,
        choices=how.choices,
        metavar=how.metavar,
        required=how.required,
        default=None,
        help=help_text,
    )


def add_flags(parser: argparse.ArgumentParser, options: type, command: str) -> None:
    """Adds the flags of the dataclass ``options`` that belong to ``command``."""
    for field in dataclasses.fields(options):
        how = _flag_of(field)
        if how is not None and command in how.commands:
            _add_one(parser, field, how)


def given_flags(args: argparse.Namespace, options: type, command: str) -> dict[str, Any]:
    """The values of ``command``'s flags of ``options`` that the user gave on the command
    line (flags left out keep the dataclass defaults)."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(options):
        how = _flag_of(field)
        if how is None or command not in how.commands:
            continue
        value = getattr(args, field.name, None)
        if value is not None:
            out[field.name] = value if how.convert is None else how.convert(value)
    return out
