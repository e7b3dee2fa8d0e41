"""The PEFT Uni-LoRA export: an adapter in PEFT's format (``peft_type = "UNILORA"``,
saved indices and scales), written by the Rust core (numpy only, no torch).

The other direction, a PEFT adapter converted into ours, is
:func:`unilora_rs.peft_interop.convert_peft`.
"""

from __future__ import annotations

from pathlib import Path

from .. import _core
from .._util import PathArg
from ..reports import PeftExportResult

__all__ = ["export_peft"]


def export_peft(adapter: PathArg, out: PathArg, *, overwrite: bool = False) -> PeftExportResult:
    """Writes the adapter in PEFT's Uni-LoRA format (``save_indices=True``: every
    layer's indices and scales), so that ``PeftModel.from_pretrained`` gives its outputs.

    The sparse projection and explicit maps export as they are; the Fastfood projection
    is dense and is refused (``export_lora`` writes its equivalent LoRA adapter). PEFT
    has no alpha: ``alpha / r`` other than 1 is folded into ``B``'s scales. See
    :attr:`PeftExportResult.notes` for what else differs. Runs in the Rust core (no
    torch); the folder appears atomically.
    """
    return _core.export_peft(Path(adapter), Path(out), overwrite=bool(overwrite))
