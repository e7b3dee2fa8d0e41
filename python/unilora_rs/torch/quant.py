"""Quantized base layers: bitsandbytes ``Linear8bitLt`` / ``Linear4bit`` and torchao
weight-only tensors, recognised by duck typing (neither library is imported here).

Uni-LoRA trains on them as on float layers (the base layer computes its own output;
``theta_d``, the scales and the branch stay float32). Merging dequantises: the weight
is rebuilt in float32, ``delta W`` added, and a plain ``nn.Linear`` of the chosen dtype
replaces the quantized layer.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "dequantize_rest",
    "dequantized_linear",
    "dequantized_weight",
    "float_dtype",
    "is_quantized",
    "quantization_kind",
]


def quantization_kind(module: nn.Module) -> str | None:
    """``"bnb-8bit"``, ``"bnb-4bit"``, ``"torchao"`` (a tensor subclass with
    ``dequantize()``), or ``None`` for a float layer."""
    weight = getattr(module, "weight", None)
    if weight is None:
        return None
    name = type(weight).__name__
    if name == "Params4bit" or getattr(weight, "quant_state", None) is not None:
        return "bnb-4bit"
    if name == "Int8Params":
        return "bnb-8bit"
    if type(weight) not in (torch.Tensor, nn.Parameter) and callable(
        getattr(weight, "dequantize", None)
    ):
        return "torchao"
    return None


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module``'s weight is stored quantized."""
    return quantization_kind(module) is not None


@torch.no_grad()
def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a (quantized or float) linear layer as float32 ``[out, in]``."""
    kind = quantization_kind(module)
    weight = module.weight
    if kind == "bnb-4bit":
        import bitsandbytes.functional as bnbf

        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks a 4-bit weight for its CPU kernel on the first CPU
            # forward pass (absmax then held in float32, transposed). Undo the packing on
            # a copy of the state (the inverse edits the state it gets) and keep the
            # float32 absmax the kernel uses (the inverse would quantise it again).
            packed_absmax = state.absmax
            state = copy.copy(state)
            state.original_nested = False
            data, state = bnbf._convert_weight_packed_for_cpu_inverse(data, state)
            state.absmax = packed_absmax.T.reshape(-1).to(torch.float32)
            state.nested = False
        return bnbf.dequantize_4bit(data, state).to(torch.float32)
    if kind == "bnb-8bit":
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = getattr(getattr(module, "state", None), "SCB", None)
        if scb is None:
            raise RuntimeError("bitsandbytes 8-bit layer without row scales (SCB)")
        # bitsandbytes' int8_vectorwise_dequant: int8 * row scale * (1 / 127)
        scale = scb.to(torch.float32).view(-1, 1)
        return weight.data.to(torch.float32) * scale * 7.874015718698502e-3
    if kind == "torchao":
        return weight.dequantize().to(torch.float32)
    return weight.detach().to(torch.float32)


def float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's float parameters outside quantized layers."""
    for module in model.modules():
        if is_quantized(module):
            continue
        for p in module.parameters(recurse=False):
            if p.is_floating_point():
                return p.dtype
    return torch.float32


def dequantized_linear(
    base: nn.Module, deltas: Sequence[torch.Tensor], dtype: torch.dtype
) -> nn.Linear:
    """A float ``nn.Linear`` of ``dtype`` with the dequantised weight of ``base`` plus
    each ``delta W`` (added in float32, rounded once)."""
    weight = dequantized_weight(base)
    for delta in deltas:
        weight = weight + delta.to(weight.device)
    out_f, in_f = weight.shape
    bias = getattr(base, "bias", None)
    linear = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=dtype)
    linear.weight.data.copy_(weight.to(dtype))
    if bias is not None:
        linear.bias.data.copy_(bias.detach().to(dtype))
    linear.requires_grad_(False)
    return linear


def dequantize_rest(model: nn.Module, dtype: torch.dtype, *, was_quantized: bool) -> None:
    """Dequantises the quantized linear layers no adapter touched and removes the
    transformers quantization markers, so that the merged model is a float model."""
    found = was_quantized
    for name, module in list(model.named_modules()):
        if name and isinstance(module, nn.Linear) and is_quantized(module):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, dequantized_linear(module, [], dtype))
            found = True
    if not found:
        return
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    for attr in ("is_quantized", "is_loaded_in_8bit", "is_loaded_in_4bit"):
        if getattr(model, attr, False):
            setattr(model, attr, False)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "quantization_method", None) is not None:
        model.quantization_method = None
