"""The switches one model's adapted layers and modules_to_save wrappers share: which
adapter is active, whether adapters are disabled, and, for a mixed batch, which adapter
each row of the batch uses (``"__base__"``: the base model)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from ..errors import InvalidArgumentError

__all__ = ["BASE_ROWS", "AdapterContext"]

#: The adapter name of batch rows that run the base model (PEFT's name).
BASE_ROWS = "__base__"


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
