"""Helpers the torch-free modules share: path and dtype arguments, atomic file writes,
and the progress bar of long Rust calls.

Nothing here knows the adapter format; the modules that do (:mod:`unilora_rs.adapter`,
the merge and the exports) build on these.
"""

from __future__ import annotations

import errno
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, Literal, TypeVar, overload

from . import _core
from .errors import DtypeError, InvalidArgumentError

__all__ = [
    "PathArg",
    "Progress",
    "as_path",
    "dtype_name",
    "file_mode",
    "incomplete",
    "umask",
    "warn_at_importer",
    "with_progress",
    "write_atomic",
    "write_bytes_atomic",
]

#: What the public functions accept as a path.
PathArg = str | os.PathLike[str]

T = TypeVar("T")


def as_path(name: str, value: object) -> Path:
    """``value`` as a :class:`~pathlib.Path`; a non-path or an empty path raises
    :class:`InvalidArgumentError` naming the argument ``name``."""
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if str(path) == "":
            raise InvalidArgumentError(f"{name} must not be empty")
        return path
    raise InvalidArgumentError(
        f"{name} must be a path (str or os.PathLike), got {type(value).__name__}"
    )


def warn_at_importer(message: str, category: type[Warning]) -> None:
    """Warns, while this package is being imported, at the line that imported it: the
    first caller outside the package and the interpreter's frozen import machinery
    (``warnings.warn``'s ``stacklevel`` skips importlib's frames, not runpy's nor the
    package's own). With no such caller (``python -m unilora_rs``) the package's line
    is named."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame = sys._getframe(1)
    caller: FrameType | None = frame
    while caller is not None and (
        caller.f_code.co_filename.startswith("<frozen ")
        or os.path.abspath(caller.f_code.co_filename).startswith(package)
    ):
        caller = caller.f_back
    target = caller or frame
    module_globals = target.f_globals
    warnings.warn_explicit(
        message,
        category,
        target.f_code.co_filename,
        target.f_lineno,
        module=module_globals.get("__name__", "<string>"),
        registry=module_globals.setdefault("__warningregistry__", {}),
    )


@overload
def dtype_name(value: object, *, allow_none: Literal[False]) -> str: ...
@overload
def dtype_name(value: object, *, allow_none: bool) -> str | None: ...
def dtype_name(value: object, *, allow_none: bool) -> str | None:
    """The name of a dtype argument (a string or a numpy dtype; ``None`` when allowed),
    checked by the core; anything else raises :class:`DtypeError`."""
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        return value
    name = getattr(value, "name", None)  # numpy dtypes
    if isinstance(name, str):
        return name
    raise DtypeError(f"dtype must be one of 'bf16', 'f16', 'f32' (or None), got {value!r}")


def write_atomic(
    target: Path,
    write: Callable[[Path], Any],
    *,
    size: int | None = None,
    check: Callable[[Path], None] | None = None,
) -> int:
    """Runs ``write(temp)`` on a temporary file beside ``target``, syncs it and renames
    it to ``target``; the temporary is removed on any failure (Ctrl-C included), and one
    that a killed writer left (its process has ended) is removed by the next write of
    ``target``.

    Before the rename the written file is validated: its size must be ``size`` when
    given, and ``check(temp)`` (which re-reads it) must not raise. A write that fails
    (a full disk) or leaves a short file raises :class:`OSError` naming ``target``, and
    nothing is left behind. The file gets the mode ``open()`` and ``cp`` give (``0o666``
    less the umask). Returns the size written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # named by the core (this process's id and the machine's tag), which first removes
    # what ended writers left beside the target; created as open() creates a file
    tmp = Path(_core.temp_file_name(target))
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        try:
            write(tmp)
        except OSError as err:
            if err.filename is not None or err.errno is None:
                raise
            raise type(err)(err.errno, f"{err.strerror} (nothing was kept)", str(target)) from err
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        written = tmp.stat().st_size
        if size is not None and written != size:
            raise incomplete(target, f"{written:,} of {size:,} bytes")
        if check is not None:
            check(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return written


def umask() -> int:
    """The process umask, read without changing it where the system tells it
    (``/proc/self/status`` on Linux), else by setting and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets from ``open()`` or ``cp``: ``0o666`` less the umask."""
    return 0o666 & ~umask()


def incomplete(target: Path, detail: str) -> OSError:
    """The error of an output that was not written completely (a full disk, a file
    size limit)."""
    return OSError(
        errno.EIO,
        f"the file was not written completely ({detail}; is the disk full?); nothing was kept",
        str(target),
    )


def write_bytes_atomic(target: Path, data: bytes) -> int:
    """``data`` written to ``target`` atomically and size-checked (:func:`write_atomic`)."""
    return write_atomic(target, lambda tmp: tmp.write_bytes(data), size=len(data))


class Progress:
    """A tqdm bar fed by a Rust call's (done, total) callback; a plain stderr line
    when tqdm is not installed."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.bar: Any = None
        self.last = -1

    def __call__(self, done: int, total: int) -> None:
        if total <= 0:
            return
        if self.bar is None:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                self.bar = False
            else:
                self.bar = tqdm(
                    total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=self.desc
                )
        if self.bar is False:
            pct = 100 * done // total
            if pct // 10 != self.last // 10 or done == total:
                print(f"{self.desc}: {pct}%", file=sys.stderr, flush=True)
                self.last = pct
        else:
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None and self.bar is not False:
            self.bar.close()


def with_progress(
    show_progress: bool, call: Callable[[Callable[[int, int], None] | None], T], *, desc: str
) -> tuple[T, float]:
    """``call(progress callback or None)`` with a progress bar named ``desc`` when asked;
    the result and the seconds it took."""
    progress: Progress | None = Progress(desc) if show_progress else None
    t0 = time.perf_counter()
    try:
        out = call(progress)
    finally:
        if progress is not None:
            progress.close()
    return out, time.perf_counter() - t0
