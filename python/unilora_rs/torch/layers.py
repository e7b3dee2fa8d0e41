"""The wrapped Linear / Conv1D layer, the per-adapter state that shares ``theta_D``, and
the per-adapter copies of ``modules_to_save``.

A :class:`UniLoRALayer` owns no trainable tensor: it keeps the frozen base layer and,
for every adapter that adapts it, a :class:`Branch`: the offsets of its ``B``
(``out x r``) and ``A`` (``r x in``) blocks inside that adapter's ``theta_D``. Each
adapter's ``theta_D`` is rebuilt ONCE per forward pass of the whole model (a forward
pre-hook on the root module calls :meth:`SharedState.refresh`) and every layer takes
views of it.

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

One :class:`AdapterContext` per model tells every layer and wrapper which adapter is
active, whether adapters are disabled, and, for a mixed batch, which adapter each row
of the batch uses (``"__base__"``: the base model).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapter import ModuleSpec
from ..errors import InvalidArgumentError

__all__ = [
    "BASE_ROWS",
    "AdapterContext",
    "Branch",
    "ModulesToSaveWrapper",
    "SharedState",
    "UniLoRALayer",
    "plain_named_modules",
]

#: The adapter name of batch rows that run the base model (PEFT's name).
BASE_ROWS = "__base__"


class SharedState:
    """What every layer of one adapter shares: its current ``theta_D``."""

    def __init__(self, compute: Callable[[], torch.Tensor]) -> None:
        self._compute = compute
        self.theta_D: torch.Tensor | None = None
        self.parts: tuple[torch.Tensor, ...] = ()
        self.sizes: list[int] = []
        self.rebuilds = 0
        self._key: tuple[Any, ...] | None = None
        self._source: Callable[[], torch.Tensor] | None = None

    def bind_source(self, source: Callable[[], torch.Tensor]) -> None:
        """``source()`` returns ``theta_d``; used for the staleness check."""
        self._source = source

    def _current_key(self) -> tuple[Any, ...]:
        theta = self._source() if self._source is not None else None
        if theta is None:
            return (None, None, None, torch.is_grad_enabled(), torch.is_inference_mode_enabled())
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
        theta_big = self._compute()
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


class AdapterContext:
    """The switches one model's layers and wrappers share: the active adapter, whether
    adapters are disabled, and the adapter of each batch row in a mixed batch."""

    def __init__(self) -> None:
        self.active: str | None = None
        self.disabled = False
        self.row_adapters: list[str] | None = None
        self._groups: dict[tuple[int, torch.device], list[tuple[str, torch.Tensor]]] = {}

    def active_list(self) -> list[str]:
        """The active adapter as a list (empty when there is none)."""
        return [] if self.active is None else [self.active]

    @contextlib.contextmanager
    def mixed(self, names: Sequence[str]) -> Iterator[None]:
        """Within the context, row ``i`` of every batch uses adapter ``names[i]``."""
        previous = self.row_adapters
        self.row_adapters = list(names)
        self._groups = {}
        try:
            yield
        finally:
            self.row_adapters = previous
            self._groups = {}

    def groups(self, rows: int, device: torch.device) -> list[tuple[str, torch.Tensor]]:
        """``(adapter, row indices)`` of a batch of ``rows`` rows (``"__base__"`` included).

        A batch that is ``k`` times as long as the list of names (``generate`` with
        ``num_beams`` or ``num_return_sequences`` repeats each input ``k`` times in a row)
        repeats each name ``k`` times, as PEFT does for beam search.
        """
        key = (rows, device)
        found = self._groups.get(key)
        if found is not None:
            return found
        names = self.row_adapters or []
        if not names or rows % len(names):
            raise InvalidArgumentError(
                f"adapter_names has {len(names)} entries but an adapted layer received a batch "
                f"of {rows} rows; give one adapter name per input row"
            )
        repeat = rows // len(names)
        expanded = [n for n in names for _ in range(repeat)]
        found = []
        for name in dict.fromkeys(expanded):
            idx = [i for i, n in enumerate(expanded) if n == name]
            found.append((name, torch.tensor(idx, dtype=torch.long, device=device)))
        self._groups[key] = found
        return found


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
    state: SharedState


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


class ModulesToSaveWrapper(nn.Module):
    """A module trained in full per adapter (``modules_to_save``, typically a task head),
    as PEFT's wrapper of the same name: ``original_module`` is the base model's module,
    kept frozen for the base model (``disable_adapter()``, ``"__base__"`` rows and
    adapters that do not save it); ``modules_to_save[name]`` is adapter ``name``'s copy.

    Attributes other than these (``weight``, ``out_features``, ...) are read from the
    module in use.
    """

    def __init__(self, original_module: nn.Module, context: AdapterContext) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self._context = context
        original_module.requires_grad_(False)

    def add(self, name: str, trainable: bool) -> nn.Module:
        """Adds adapter ``name``'s copy of the original module and returns it."""
        module = copy.deepcopy(self.original_module)
        module.requires_grad_(trainable)
        self.modules_to_save[name] = module
        return module

    def active_module(self) -> nn.Module:
        """The module the active adapter runs (the original when it saves no copy)."""
        ctx = self._context
        if ctx.disabled or ctx.active is None or ctx.active not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[ctx.active]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in {"_modules", "_parameters", "_buffers", "original_module"}:
                raise
            return getattr(self.active_module(), name)

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        ctx = self._context
        if ctx.disabled or ctx.row_adapters is None:
            return self.active_module()(x, *args, **kwargs)
        if not isinstance(x, torch.Tensor):
            raise InvalidArgumentError(
                "a mixed-adapter batch needs the batch as the first tensor argument of a "
                f"modules_to_save module, got {type(x).__name__}"
            )
        pieces = []
        for name, rows in ctx.groups(x.shape[0], x.device):
            module = self.modules_to_save._modules.get(name)
            if module is None:
                module = self.original_module
            pieces.append((rows, module(x.index_select(0, rows), *args, **kwargs)))
        first = pieces[0][1]
        if not isinstance(first, torch.Tensor):
            raise InvalidArgumentError(
                "a mixed-adapter batch through a modules_to_save module needs a tensor output, "
                f"got {type(first).__name__}"
            )
        out = first.new_empty((x.shape[0], *first.shape[1:]))
        for rows, value in pieces:
            out.index_copy_(0, rows, value)
        return out


def plain_named_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` as if no adapter were there: a :class:`UniLoRALayer`
    counts as its base layer and a :class:`ModulesToSaveWrapper` as its original module,
    under the name the module had in the plain model."""
    seen: set[int] = set()

    def walk(module: nn.Module, name: str) -> Iterator[tuple[str, nn.Module]]:
        if isinstance(module, UniLoRALayer):
            module = module.base_layer
        elif isinstance(module, ModulesToSaveWrapper):
            module = module.original_module
        if id(module) in seen:
            return
        seen.add(id(module))
        yield name, module
        for child_name, child in module._modules.items():
            if child is not None:
                yield from walk(child, f"{name}.{child_name}" if name else child_name)

    yield from walk(model, prefix)
