"""``modules_to_save``: a module trained in full per adapter (typically a task head),
as PEFT's ``ModulesToSaveWrapper``."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..errors import InvalidArgumentError
from .context import AdapterContext

__all__ = ["ModulesToSaveWrapper"]


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
