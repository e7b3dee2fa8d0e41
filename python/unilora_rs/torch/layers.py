"""The wrapped Linear / Conv1D layer: the frozen base layer plus, per adapter, a LoRA
branch whose ``A`` and ``B`` are views of that adapter's ``theta_D``.

A :class:`UniLoRALayer` owns no trainable tensor: it keeps the frozen base layer and,
for every adapter that adapts it, a :class:`Branch`: the offsets of its ``B``
(``out x r``) and ``A`` (``r x in``) blocks inside that adapter's ``theta_D``, which the
adapter's :class:`~unilora_rs.torch.cache.ThetaDCache` rebuilds once per forward pass
of the whole model. Which adapter a call runs (one, none, or one per batch row) comes
from the model's :class:`~unilora_rs.torch.context.AdapterContext`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapter import ModuleSpec
from .cache import ThetaDCache
from .context import AdapterContext
from .modules_to_save import ModulesToSaveWrapper

__all__ = ["Branch", "ModulesToSaveWrapper", "UniLoRALayer"]


@dataclass
class Branch:
    """One adapter's LoRA branch of a layer: where its ``B`` and ``A`` sit in that
    adapter's ``theta_D`` and in the split blocks (``slot`` is ``B``, ``slot + 1`` ``A``)."""

    spec: ModuleSpec
    rank: int
    scaling: float
    offset_b: int
    offset_a: int
    end: int
    slot: int
    state: ThetaDCache


class UniLoRALayer(nn.Module):
    """A frozen ``nn.Linear`` (also bitsandbytes / torchao quantized) or GPT-2 ``Conv1D``
    plus, per adapter, the Uni-LoRA branch ``dropout(x) @ A^T @ B^T * (alpha / r)`` with
    ``A`` and ``B`` views of that adapter's ``theta_D``.

    The branch runs in float32 (``x`` is cast up; the result is cast back to the base
    output's dtype); under autocast, ``F.linear`` follows the autocast dtype as in PEFT.
    """

    def __init__(self, base_layer: nn.Module, context: AdapterContext) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.branches: dict[str, Branch] = {}
        self.lora_dropout = nn.ModuleDict()
        self.merged_adapters: list[str] = []
        self._context = context

    def add_branch(self, name: str, branch: Branch, dropout: float) -> None:
        """Adds adapter ``name``'s branch."""
        self.branches[name] = branch
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def remove_branch(self, name: str) -> None:
        """Removes adapter ``name``'s branch (it must not be merged)."""
        self.branches.pop(name, None)
        if name in self.lora_dropout:
            del self.lora_dropout[name]

    @property
    def merged(self) -> bool:
        """Whether any adapter is merged into the base weight."""
        return bool(self.merged_adapters)

    @property
    def in_features(self) -> int:
        """Input features of the base layer."""
        return next(iter(self.branches.values())).spec.in_features

    @property
    def out_features(self) -> int:
        """Output features of the base layer."""
        return next(iter(self.branches.values())).spec.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (so code that inspects ``.weight`` keeps working)."""
        return self.base_layer.weight  # type: ignore[return-value]

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias."""
        return self.base_layer.bias  # type: ignore[return-value]

    def extra_repr(self) -> str:
        parts = [
            f"{name}: kind={b.spec.kind}, rank={b.rank}, scaling={b.scaling}, "
            f"theta_D[{b.offset_b}:{b.end}]"
            for name, b in self.branches.items()
        ]
        return "; ".join(parts)

    def lora_matrices(
        self, theta_big: torch.Tensor, adapter: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of ``adapter``: views of its ``theta_D``, ``r x in`` and ``out x r``."""
        br = self.branches[adapter]
        b = theta_big[br.offset_b : br.offset_a].view(br.spec.out_features, br.rank)
        a = theta_big[br.offset_a : br.end].view(br.rank, br.spec.in_features)
        return a, b

    def delta_weight(self, theta_big: torch.Tensor, adapter: str) -> torch.Tensor:
        """``(alpha / r) * B @ A`` of ``adapter`` in float32, in the layout of the base
        weight (transposed for Conv1D)."""
        a, b = self.lora_matrices(theta_big, adapter)
        br = self.branches[adapter]
        delta = b @ a
        if br.scaling != 1.0:
            delta = delta * br.scaling
        return delta.T if br.spec.kind == "conv1d" else delta

    @torch.no_grad()
    def merge(self, theta_big: torch.Tensor, adapter: str) -> None:
        """``W += delta`` computed in float32 and rounded once to ``W``'s dtype."""
        if adapter in self.merged_adapters or adapter not in self.branches:
            return
        w = self.base_layer.weight
        w.copy_((w.float() + self.delta_weight(theta_big, adapter).to(w.device)).to(w.dtype))
        self.merged_adapters.append(adapter)

    @torch.no_grad()
    def unmerge(self, theta_big: torch.Tensor, adapter: str) -> None:
        """``W -= delta`` (exact up to one rounding of ``W``'s dtype)."""
        if adapter not in self.merged_adapters:
            return
        w = self.base_layer.weight
        w.copy_((w.float() - self.delta_weight(theta_big, adapter).to(w.device)).to(w.dtype))
        self.merged_adapters.remove(adapter)

    def _branch(self, x: torch.Tensor, name: str, br: Branch) -> torch.Tensor:
        parts = br.state.current()
        b = parts[br.slot].view(br.spec.out_features, br.rank)
        a = parts[br.slot + 1].view(br.rank, br.spec.in_features)
        h = self.lora_dropout[name](x)
        if not torch.is_autocast_enabled(h.device.type):
            h = h.to(torch.float32)
        lora = F.linear(F.linear(h, a), b)
        if br.scaling != 1.0:
            lora = lora * br.scaling
        return lora

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        ctx = self._context
        if self.merged_adapters or ctx.disabled:
            return result
        if ctx.row_adapters is not None:
            for name, rows in ctx.groups(x.shape[0], x.device):
                br = self.branches.get(name)
                if br is not None:
                    lora = self._branch(x.index_select(0, rows), name, br)
                    result = result.index_add(0, rows, lora.to(result.dtype))
            return result
        br = self.branches.get(ctx.active) if ctx.active is not None else None
        if br is None:
            return result
        return result + self._branch(x, ctx.active, br).to(result.dtype)  # type: ignore[arg-type]
