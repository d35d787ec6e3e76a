"""int8 weight-only language models: every linear layer of the decoder layers keeps its weight as int8, one scale
per output channel (symmetric: scale = max |w| of the row / 127), activations stay in the model's dtype.

    Int8Linear       x [..., in] -> x @ (w_int8 * scale).T: inside a compiled decode step as a multiply-and-sum
                     over the int8 weight, which Inductor fuses into one pass reading a byte per weight instead of
                     four (a small step is bound by reading its weights) and cannot fold back into a converted
                     copy when it freezes the weights; elsewhere (prefill, eager steps) the weight is converted
                     for the product and dropped
    quantize_int8    the VLM's decoder layers' nn.Linear layers -> Int8Linear, in place (a model already int8 is
                     left as it is); for inference only (the weights become buffers: nothing trains them). A VLM
                     that `supports_int8_checkpoints` (MiniMind) records it in `config.int8_weights`, so that it
                     saves as int8 and its folder loads as int8

The vision tower, projector, embeddings and LM head keep their weights: the tower runs once per image, and the
decoder layers hold nearly all of the language model's weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FUSED_ROWS = 8  # compiled steps of at most this many rows multiply and sum over the int8 weight (never converted)


class Int8Linear(nn.Module):
    """A bias-free linear layer whose weight is int8 with a per-output-channel scale."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Int8Linear takes bias-free linear layers")
        weight = linear.weight.detach().float()  # [out, in]
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127  # [out, 1]
        self.register_buffer("weight_int8", torch.round(weight / scale).to(torch.int8))  # [out, in]
        self.register_buffer("scale", scale[:, 0].to(linear.weight.dtype))  # [out]
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight_int8, self.scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight"


def int8_linear(x: torch.Tensor, weight_int8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ (weight_int8 [out, in] * scale [out]).T -> [..., out]."""
    if torch.compiler.is_compiling() and x.shape[:-1].numel() <= FUSED_ROWS:  # a decode step: one fused pass
        return (x.unsqueeze(-2) * weight_int8).sum(-1) * scale  # [..., 1, in] * [out, in] -> [..., out]
    flat = F.linear(x.reshape(-1, x.shape[-1]), weight_int8.to(x.dtype))  # [rows, out]
    return (flat * scale).view(*x.shape[:-1], weight_int8.shape[0])  # [..., out]


def quantize_int8(model: nn.Module) -> int:
    """Replace every bias-free nn.Linear inside the model's decoder layers (`decoder_layers()`) by an Int8Linear of
    the same weight, in place; -> how many were replaced (0 for a model already int8, e.g. loaded from an int8
    folder). Call it on a model ready for inference (on its device, in its dtype): the scales take the weights'
    dtype."""
    replaced = 0
    for layer in model.decoder_layers():
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear and child.bias is None:
                    setattr(parent, name, Int8Linear(child))
                    replaced += 1
    if not replaced and not int8_weights(model):
        raise ValueError("int8: the decoder layers have no bias-free linear layers to quantize")
    if model.supports_int8_checkpoints:
        model.config.int8_weights = True
    return replaced


def int8_weights(model: nn.Module) -> int:
    """How many weights the model holds as int8 (0: none)."""
    return sum(m.weight_int8.numel() for m in model.modules() if isinstance(m, Int8Linear))
