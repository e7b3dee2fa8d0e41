"""The ``unilora`` command line (also ``python -m unilora_rs``).

Each sub-command lives in its own module under :mod:`unilora_rs.commands` and exposes
``register(subparsers)``; the module's ``run(args) -> int`` does the work. Errors are
printed as one line on stderr with a non-zero exit code, never as a traceback
(set ``UNILORA_DEBUG=1`` to see the traceback). SIGTERM is handled like Ctrl-C: the
running command stops, removes its temporary output and exits with 143.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from types import FrameType

from . import commands
from ._version import __version__
from .errors import UniLoraError


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="unilora",
        description="Uni-LoRA adapters: reconstruct, merge into safetensors, export.",
    )
    parser.add_argument("--version", action="version", version=f"unilora_rs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):  # shared helpers, not commands
            continue
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(sub)
    return parser


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM (see :func:`main`)."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While active (main thread only), SIGTERM raises :class:`Terminated`: work in
    Rust is cancelled and cleans up, as for Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _sigterm_raises():
            code = int(args.run(args))
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers below
        return code
    except KeyboardInterrupt:
        print("unilora: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("unilora: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except BrokenPipeError:
        # The reader of stdout went away (`unilora inspect --json | head`): stop quietly,
        # as other command-line tools do, without a second error at interpreter exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except Exception as err:
        if os.environ.get("UNILORA_DEBUG"):
            raise
        if isinstance(err, UniLoraError):
            msg = str(err)
        elif isinstance(err, (OSError, ValueError, TypeError, ImportError)):
            msg = f"{type(err).__name__}: {err}"
        else:
            msg = (
                f"internal error ({type(err).__name__}: {err}); set UNILORA_DEBUG=1 for a traceback"
            )
        print(f"unilora: error: {' '.join(msg.split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
