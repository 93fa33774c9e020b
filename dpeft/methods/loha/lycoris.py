"""What LoHa and LoKr share (the LyCORIS family in HF PEFT): rank/alpha patterns, rank and module dropout,
and a forward that applies the delta weight with the base layer's own linear or convolution.

Both methods build a full delta weight per forward (as PEFT does): their factors are not low-rank products a
two-GEMM path could use. Since the delta is a full matrix anyway, the fused path (the only active adapter on a
plain float layer) runs ONE linear/convolution with W + delta W, where PEFT runs the base layer and then a
second full GEMM with delta W.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dpeft.config import PeftConfig
from dpeft.methods.base import MethodLayer
from dpeft.methods.lora.layer import pattern_value
from dpeft.quant import BaseHandler

#: Base-layer kinds PEFT's LyCORIS methods support (nn.Linear, nn.Conv1d, nn.Conv2d; not transformers' Conv1D).
LYCORIS_KINDS = ("linear", "conv1d", "conv2d")


def lycoris_supports(handler: BaseHandler) -> bool:
    """Whether LoHa/LoKr can sit on this base layer (the layer types PEFT allows for them)."""
    return handler.kind in LYCORIS_KINDS and not handler.fan_in_fan_out


def kaiming(t: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def zeros(t: torch.Tensor) -> None:
    t.zero_()


class LycorisLayer(MethodLayer):
    """Shared part of LoHa/LoKr layers; subclasses declare specs and implement `make_delta`.

    Attributes:
        rank_dropout_scale: Whether rank dropout rescales the kept rows by 1 / (kept fraction).
    """

    rank_dropout_scale: bool = True

    def __init__(self, handler: BaseHandler, config: PeftConfig, module_name: str) -> None:
        super().__init__(handler, config, module_name)
        self.kind = handler.kind
        self.r = pattern_value(config.rank_pattern, module_name, config.r)
        self.alpha = pattern_value(config.alpha_pattern, module_name, config.alpha)
        if self.r <= 0:
            raise ValueError(f"{module_name}: r must be a positive integer, got {self.r}")
        self.scaling = self.alpha / self.r
        self.rank_dropout = config.rank_dropout
        self.module_dropout = config.module_dropout
        self.weight_shape = tuple(handler.weight().shape)
        layer = handler.layer
        self.in_dim = handler.in_features // getattr(layer, "groups", 1)  # a grouped conv's weight sees in/groups

    def effective_conv(self, use: bool) -> bool:
        """PEFT's rule: the CP (Tucker) form of a conv adapter is only used when the kernel is not 1x1."""
        return use and self.kind != "linear" and any(k != 1 for k in self.handler.layer.kernel_size)

    def make_delta(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """The scaled delta weight, any shape with the base weight's number of elements."""
        raise NotImplementedError

    def delta_weight(self, p: dict[str, torch.Tensor], rank_dropout: bool = False) -> torch.Tensor:
        weight = self.make_delta(p).reshape(self.weight_shape)
        if rank_dropout:
            drop = (torch.rand(weight.size(0)) > self.rank_dropout).to(weight.dtype)
            drop = drop.view(-1, *[1] * (weight.dim() - 1)).to(weight.device)
            if self.rank_dropout_scale:
                drop = drop / drop.mean()
            weight = weight * drop
        return weight

    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "linear":
            return F.linear(x, weight, bias)
        layer = self.handler.layer
        return self.handler.conv_fn(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)

    def fused_forward(self, x: torch.Tensor, p: dict[str, torch.Tensor], training: bool) -> torch.Tensor | None:
        """One GEMM / convolution with W + delta W instead of two (the delta weight is built anyway)."""
        layer, w = self.handler.layer, self.handler.weight_param
        first = next(iter(p.values()))
        plain = self.handler.kind in ("linear", "conv1d", "conv2d") and self.handler.is_plain()
        if not plain or not (x.dtype == w.dtype == first.dtype):
            return None  # quantized or mixed-precision bases take the general path
        if getattr(layer, "padding_mode", "zeros") != "zeros":
            return None
        if training and not bool(torch.rand(1) > self.module_dropout):  # same draw as `forward`
            return self._apply_weight(x, w, layer.bias)
        delta = self.delta_weight(p, rank_dropout=training and bool(self.rank_dropout))
        return self._apply_weight(x, w + delta, layer.bias)

    def forward(
        self, x: torch.Tensor, result: torch.Tensor, p: dict[str, torch.Tensor], training: bool
    ) -> torch.Tensor:
        # Module dropout skips the adapter for a step. The draw happens in every training step, even at p=0, as in
        # PEFT: the global RNG then advances alike, so seeded runs (and any dropout after this layer) match PEFT's.
        if training and not bool(torch.rand(1) > self.module_dropout):
            return result
        delta = self.delta_weight(p, rank_dropout=training and bool(self.rank_dropout))
        return result + self._apply_weight(x, delta, None)
