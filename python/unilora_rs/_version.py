"""The versions of this build: the package's and the projection spec's (from the core)."""

from __future__ import annotations

from . import _core

__all__ = ["SPEC_VERSION", "__version__"]

#: The package version (the Rust crate's ``CARGO_PKG_VERSION``).
__version__: str = _core.__version__
#: The version of the generator specification (docs/SPEC.md) the core implements.
SPEC_VERSION: int = _core.SPEC_VERSION
