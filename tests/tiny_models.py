"""Tiny transformers models built from configs (no downloads), shared by the torch tests."""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import nn

VOCAB = 64


def tiny_llama(seed: int = 0, hidden: int = 32, dtype: Any = None) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(cfg)
    return model.to(dtype) if dtype is not None else model


def tiny_gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg)


def tiny_roberta(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
        num_labels=3,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    return transformers.RobertaForSequenceClassification(cfg)
