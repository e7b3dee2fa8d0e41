"""``ThetaDCache``: one adapter's ``theta_D = P theta_d``, rebuilt once per forward pass
and shared by every layer of the adapter.

The root module's forward pre-hook calls :meth:`ThetaDCache.prepare`; the rebuild runs
the projection's kernels (:func:`unilora_rs.torch.ops.rebuild`; in the ``"cached"``
index mode through the int32 map kept here per device) and cuts ``theta_D`` into every
layer's ``B`` / ``A`` blocks, of which each layer takes views.

Why this is right under the usual training tools:

* gradient checkpointing: a recomputed block reads the same ``theta_D`` tensor (the
  pre-hook does not run again, and ``theta_d`` is unchanged until the optimizer step),
  so the recomputed values are bit for bit the original ones;
* DDP: ``theta_d`` lives on the root module only; its gradient is produced by one
  backward node (the rebuild), once per step;
* ``torch.compile``: the rebuild is one custom operator; the layer only slices, views
  and multiplies.

With gradients off (``torch.no_grad()``, ``torch.inference_mode()``, ``generate()``)
the pre-hook keeps each adapter's ``theta_D`` between passes and rebuilds it only when
``theta_d`` was modified (its version counter or storage) or the mode changed, so
decoding does not rebuild per token. A layer called on its own (outside a forward of
the root) rebuilds ``theta_D`` lazily by the same rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .ops import Params, build_index_map, rebuild, resolve_backend

__all__ = ["ThetaDCache"]


class ThetaDCache:
    """One adapter's current ``theta_D``, rebuilt from ``source()`` (its ``theta_d``)
    through ``projection`` with the adapter's index mode and kernel backend."""

    def __init__(
        self,
        source: Callable[[], torch.Tensor],
        projection: Params,
        index_mode: str,
        backend: str,
    ) -> None:
        self._source = source
        self.projection = projection
        self.index_mode = index_mode
        self.backend = backend
        #: The int32 map of the ``"cached"`` index mode, on ``theta_d``'s device.
        self.index_map: torch.Tensor | None = None
        self.theta_D: torch.Tensor | None = None
        self.parts: tuple[torch.Tensor, ...] = ()
        #: The length of every layer's ``B`` and ``A`` block, in flattening order.
        self.sizes: list[int] = []
        self.rebuilds = 0
        self._key: tuple[Any, ...] | None = None

    # ------------------------------------------------------------------ rebuilding

    def rebuild(self) -> torch.Tensor:
        """``theta_D`` of the current ``theta_d`` (differentiable; nothing is kept)."""
        theta = self._source()
        if self.index_mode == "cached":
            if self.index_map is None or self.index_map.device != theta.device:
                self.sync_index_map()
            return rebuild(theta, self.projection, index=self.index_map)
        return rebuild(theta, self.projection, backend=self.backend)

    def sync_index_map(self) -> None:
        """Builds (cached mode) or drops (on-the-fly mode) the int32 map on theta_d's device."""
        if self.index_mode != "cached":
            self.index_map = None
            return
        device = self._source().device
        if self.index_map is None or self.index_map.device != device:
            with torch.no_grad():
                self.index_map = build_index_map(self.projection, device)

    def set_index_mode(self, mode: str, backend: str | None) -> None:
        """Switches the index mode (and the backend, checked for ``theta_d``'s device)."""
        if backend is not None:
            resolve_backend(self._source().device, backend)
            self.backend = backend
        self.index_mode = mode
        self.sync_index_map()
        self.clear()

    # ------------------------------------------------------------------ keeping

    def _current_key(self) -> tuple[Any, ...]:
        theta = self._source()
        return (
            theta._version,
            theta.data_ptr(),
            theta.device,
            torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(),
        )

    def refresh(self) -> tuple[torch.Tensor, ...]:
        """Rebuilds ``theta_D`` from ``theta_d`` and keeps it for the layers of this pass.

        ``theta_D`` is cut with ONE ``split`` into the flat ``B`` / ``A`` blocks of every
        layer, so the backward pass assembles the gradient of ``theta_D`` with one
        concatenation (per-layer slicing would allocate a zero-filled ``D``-sized
        gradient per matrix).
        """
        theta_big = self.rebuild()
        self.theta_D = theta_big
        self.parts = theta_big.split(self.sizes)
        if not torch.compiler.is_compiling():
            self._key = self._current_key()
            self.rebuilds += 1
        return self.parts

    def is_fresh(self) -> bool:
        """Whether the kept ``theta_D`` still matches ``theta_d`` and the grad mode."""
        return self.theta_D is not None and self._key == self._current_key()

    def prepare(self, cache: bool) -> None:
        """The root pre-hook's step: rebuild, or, with ``cache`` and gradients off,
        keep a ``theta_D`` that is still fresh (no rebuild per decoding step)."""
        keep = cache and not torch.is_grad_enabled() and self.is_fresh()
        if torch.compiler.is_compiling() or not keep:
            self.refresh()

    def current(self) -> tuple[torch.Tensor, ...]:
        """The flat blocks of the current pass's ``theta_D`` (rebuilt when missing or stale)."""
        if self.theta_D is None:
            return self.refresh()
        if not torch.compiler.is_compiling() and self._key != self._current_key():
            return self.refresh()
        return self.parts

    def clear(self) -> None:
        """Drops the kept ``theta_D``."""
        self.theta_D = None
        self.parts = ()
        self._key = None
