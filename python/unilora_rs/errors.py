"""Exceptions raised by unilora_rs.

Every error of the package derives from :class:`UniLoraError`; most also derive from
the built-in exception a caller would naturally catch (``ValueError``, ``TypeError``).
File-system problems are raised as Python's own :class:`OSError` subclasses
(``FileNotFoundError``, ``FileExistsError``, ...), with the path attached.
"""

from __future__ import annotations

__all__ = [
    "DtypeError",
    "FormatError",
    "InternalError",
    "InvalidArgumentError",
    "MismatchError",
    "MissingDependencyError",
    "UniLoraError",
    "UniLoraWarning",
    "VectorError",
]


class UniLoraError(Exception):
    """Base class of every unilora_rs error."""


class InvalidArgumentError(UniLoraError, ValueError):
    """A bad argument: ``d = 0``, ``d > D``, empty shapes, a non-positive dimension..."""


class VectorError(InvalidArgumentError):
    """``theta_d`` has the wrong length or holds NaN/Inf."""


class DtypeError(UniLoraError, TypeError):
    """An unsupported dtype (the message lists the supported ones)."""


class FormatError(UniLoraError, ValueError):
    """A malformed file: corrupt safetensors, bad JSON, an oversized header..."""


class MismatchError(UniLoraError, ValueError):
    """Adapter and base model (or an adapter and its config) disagree."""


class MissingDependencyError(UniLoraError, ImportError):
    """A feature needs packages that are not installed; the message names every one and
    the command that installs them (see :mod:`unilora_rs.extras`)."""


class InternalError(UniLoraError, RuntimeError):
    """A bug rather than a bad input (a worker thread panicked); please report it."""


class UniLoraWarning(UserWarning):
    """Something the user should know about a result that is still correct (e.g. files a
    merge left out of its output)."""
