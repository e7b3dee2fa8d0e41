"""The wrapped Linear / Conv1D layer and the per-model state that shares ``theta_D``.

A :class:`UniLoRALayer` owns no trainable tensor: it keeps the frozen base layer and
the offsets of its ``B`` (``out x r``) and ``A`` (``r x in``) blocks inside ``theta_D``.
``theta_D`` is rebuilt ONCE per forward pass of the whole model (a forward pre-hook on
the root module calls :meth:`SharedState.refresh`) and every layer takes views of it.

Why this is right under the usual training tools:

* gradient checkpointing: a recomputed block reads the same ``theta_D`` tensor (the
  pre-hook does not run again, and ``theta_d`` is unchanged until the optimizer step),
  so the recomputed values are bit for bit the original ones;
* DDP: ``theta_d`` lives on the root module only; its gradient is produced by one
  backward node (the rebuild), once per step;
* ``torch.compile``: the rebuild is one custom operator; the layer only slices, views
  and multiplies.

A layer called on its own (outside a forward of the root) rebuilds ``theta_D`` lazily,
and in eager mode a cached ``theta_D`` is refreshed whenever ``theta_d`` was modified
in place (its version counter) or the grad / inference mode changed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapter import ModuleSpec

__all__ = ["SharedState", "UniLoRALayer"]


class SharedState:
    """What every layer of one model shares: the current ``theta_D`` and switches."""

    def __init__(self, compute: Callable[[], torch.Tensor]) -> None:
        self._compute = compute
        self.theta_D: torch.Tensor | None = None
        self.parts: tuple[torch.Tensor, ...] = ()
        self.sizes: list[int] = []
        self.disabled = False
        self._key: tuple[Any, ...] | None = None
        self._source: Callable[[], torch.Tensor] | None = None

    def bind_source(self, source: Callable[[], torch.Tensor]) -> None:
        """``source()`` returns ``theta_d``; used for the eager staleness check."""
        self._source = source

    def _current_key(self) -> tuple[Any, ...]:
        theta = self._source() if self._source is not None else None
        version = theta._version if theta is not None else None
        return (
            version,
            None if theta is None else theta.device,
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
        theta_big = self._compute()
        self.theta_D = theta_big
        self.parts = theta_big.split(self.sizes)
        if not torch.compiler.is_compiling():
            self._key = self._current_key()
        return self.parts

    def current(self) -> tuple[torch.Tensor, ...]:
        """The flat blocks of the current pass's ``theta_D`` (rebuilt when missing or stale)."""
        if self.theta_D is None:
            return self.refresh()
        if not torch.compiler.is_compiling() and self._key != self._current_key():
            return self.refresh()
        return self.parts

    def clear(self) -> None:
        """Drops the cached ``theta_D``."""
        self.theta_D = None
        self.parts = ()
        self._key = None


class UniLoRALayer(nn.Module):
    """A frozen ``nn.Linear`` or GPT-2 ``Conv1D`` plus the Uni-LoRA branch
    ``dropout(x) @ A^T @ B^T * (alpha / r)``, with ``A`` and ``B`` views of ``theta_D``.

    The branch runs in float32 (``x`` is cast up; the result is cast back to the base
    output's dtype); under autocast, ``F.linear`` follows the autocast dtype as in PEFT.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        spec: ModuleSpec,
        *,
        rank: int,
        scaling: float,
        offset: int,
        slot: int,
        dropout: float,
        state: SharedState,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.spec = spec
        self.rank = rank
        self.scaling = float(scaling)
        self.offset_b = offset
        self.offset_a = offset + spec.out_features * rank
        self.end = self.offset_a + rank * spec.in_features
        self.slot = slot  # the blocks of theta_D.split(): B at slot, A at slot + 1
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self._state = state

    @property
    def in_features(self) -> int:
        """Input features of the base layer."""
        return self.spec.in_features

    @property
    def out_features(self) -> int:
        """Output features of the base layer."""
        return self.spec.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (so code that inspects ``.weight`` keeps working)."""
        return self.base_layer.weight  # type: ignore[return-value]

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias."""
        return self.base_layer.bias  # type: ignore[return-value]

    def extra_repr(self) -> str:
        return (
            f"kind={self.spec.kind}, in={self.in_features}, out={self.out_features}, "
            f"rank={self.rank}, scaling={self.scaling}, theta_D[{self.offset_b}:{self.end}]"
        )

    def lora_matrices(self, theta_big: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)``: views of ``theta_D`` shaped ``r x in`` and ``out x r`` (float32)."""
        r = self.rank
        b = theta_big[self.offset_b : self.offset_a].view(self.out_features, r)
        a = theta_big[self.offset_a : self.end].view(r, self.in_features)
        return a, b

    def _views(self) -> tuple[torch.Tensor, torch.Tensor]:
        parts = self._state.current()
        b = parts[self.slot].view(self.out_features, self.rank)
        a = parts[self.slot + 1].view(self.rank, self.in_features)
        return a, b

    def delta_weight(self, theta_big: torch.Tensor) -> torch.Tensor:
        """``(alpha / r) * B @ A`` in float32, in the layout of the base weight
        (transposed for Conv1D)."""
        a, b = self.lora_matrices(theta_big)
        delta = b @ a
        if self.scaling != 1.0:
            delta = delta * self.scaling
        return delta.T if self.spec.kind == "conv1d" else delta

    @torch.no_grad()
    def merge(self, theta_big: torch.Tensor) -> None:
        """``W += delta`` computed in float32 and rounded once to ``W``'s dtype."""
        if self.merged:
            return
        w = self.base_layer.weight
        w.copy_((w.float() + self.delta_weight(theta_big).to(w.device)).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self, theta_big: torch.Tensor) -> None:
        """``W -= delta`` (exact up to one rounding of ``W``'s dtype)."""
        if not self.merged:
            return
        w = self.base_layer.weight
        w.copy_((w.float() - self.delta_weight(theta_big).to(w.device)).to(w.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged or self._state.disabled:
            return result
        a, b = self._views()
        h = self.dropout(x)
        if not torch.is_autocast_enabled(h.device.type):
            h = h.to(torch.float32)
        lora = F.linear(F.linear(h, a), b)
        if self.scaling != 1.0:
            lora = lora * self.scaling
        return result + lora.to(result.dtype)
