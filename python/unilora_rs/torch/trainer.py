"""``transformers.Trainer`` support (moved to :mod:`unilora_rs.torch.training.hf_trainer`;
this name stays for existing imports)."""

from __future__ import annotations

from .training.hf_trainer import UniLoRATrainer, UniLoRATrainerMixin, restore_adapter

__all__ = ["UniLoRATrainer", "UniLoRATrainerMixin", "restore_adapter"]
