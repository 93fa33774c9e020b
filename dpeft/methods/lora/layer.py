"""LoRA on linear (incl. transformers `Conv1D`), embedding and convolution base layers.

Math, for input x and base output y:  y + s * B(A(dropout(x)))  with s = lora_alpha / r (rsLoRA: / sqrt(r)).
Key names and initialisation follow HF PEFT: `lora_A.weight`/`lora_B.weight` (convs: conv kernels),
`lora_embedding_A`/`lora_embedding_B` for embeddings.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from dpeft.methods.base import MethodLayer
from dpeft.methods.lora.config import LoraConfig
from dpeft.methods.lora.fused import LoraLinearFn
from dpeft.quant import BaseHandler
from dpeft.store import ADAPTER, ParamSpec


def pattern_value(patterns: dict[str, int], module_name: str, default: int) -> int:
    """PEFT's rank/alpha pattern lookup: the first pattern that matches the end of the module name wins."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return value
    return default


def _kaiming(t: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class LoraLayer(MethodLayer):
    """LoRA (and its DoRA variant) for one adapter on one base layer; the form follows `handler.kind`."""

    def __init__(self, handler: BaseHandler, config: LoraConfig, module_name: str) -> None:
        super().__init__(handler, config, module_name)
        self.r = pattern_value(config.rank_pattern, module_name, config.r)
        alpha = pattern_value(config.alpha_pattern, module_name, config.lora_alpha)
        self.scaling = alpha / math.sqrt(self.r) if config.use_rslora else alpha / self.r
        self.dropout = config.lora_dropout
        self.kind = handler.kind
        self.lora_bias = config.lora_bias and self.kind != "embedding"
        groups = getattr(handler.layer, "groups", 1) if self.kind.startswith("conv") else 1
        if groups > 1:
            if self.r % groups:
                raise ValueError(f"{module_name}: rank {self.r} must be divisible by the conv's groups={groups}")
            self.can_merge = False  # B A is not a grouped kernel; PEFT does not merge these either
        self.specs = self._lora_specs(config.init_lora_weights)

    # ------------------------------------------------------------------ declaration
    def _lora_specs(self, init: bool | str) -> list[ParamSpec]:
        h, r = self.handler, self.r
        if self.kind == "embedding":
            a_init, b_init = (None, nn.init.normal_) if init is not False else (_randn, _randn)
            return [
                ParamSpec("lora_A", (r, h.in_features), ("lora_embedding_A", ADAPTER), a_init),
                ParamSpec("lora_B", (h.out_features, r), ("lora_embedding_B", ADAPTER), b_init),
            ]
        if self.kind == "linear":
            a_shape, b_shape = (r, h.in_features), (h.out_features, r)
        else:  # convolution: A is a conv with the base kernel, B a 1x1 conv
            layer = h.layer
            a_shape = (r, h.in_features, *layer.kernel_size)
            b_shape = (h.out_features, r // layer.groups, *([1] * len(layer.kernel_size)))
        if init is True:
            a_init = _kaiming
        elif init == "gaussian":
            a_init = lambda t: nn.init.normal_(t, std=1 / r)  # noqa: E731
        else:
            a_init = _kaiming
        b_init = _kaiming if init is False else None
        specs = [
            ParamSpec("lora_A", a_shape, ("lora_A", ADAPTER, "weight"), a_init),
            ParamSpec("lora_B", b_shape, ("lora_B", ADAPTER, "weight"), b_init),
        ]
        if self.lora_bias:
            bias_init = _uniform_bias(b_shape[1] * math.prod(b_shape[2:])) if init is False else None
            specs.append(ParamSpec("lora_B_bias", (h.out_features,), ("lora_B", ADAPTER, "bias"), bias_init))
        return specs

    # ------------------------------------------------------------------ forward
    def lora_delta(self, x: torch.Tensor, p: dict[str, torch.Tensor], result: torch.Tensor | None) -> torch.Tensor:
        """``result + s * B(A(x))`` (``s * B(A(x))`` when `result` is None), fused where the shapes allow."""
        A, B = p["lora_A"], p["lora_B"]
        if self.kind == "linear":
            hidden = F.linear(x, A)
            if (
                result is not None
                and "lora_B_bias" not in p
                and result.dtype == hidden.dtype
                and result.is_contiguous()
            ):
                # One GEMM that also accumulates into the base output: no separate delta tensor or add pass.
                flat = torch.addmm(
                    result.reshape(-1, result.shape[-1]), hidden.reshape(-1, self.r), B.t(), alpha=self.scaling
                )
                return flat.view(result.shape)
            delta = F.linear(hidden, B, p.get("lora_B_bias")) * self.scaling
        elif self.kind == "embedding":
            delta = (self.handler.embed(x, A.t()) @ B.t()) * self.scaling
            scale = self.handler.embed_scale()
            if scale is not None:
                delta = delta * scale.to(delta.dtype)
        else:
            layer = self.handler.layer
            conv = self.handler.conv_fn
            hidden = conv(x, A, None, layer.stride, layer.padding)
            delta = conv(hidden, B, p.get("lora_B_bias"), 1, 0, 1, layer.groups) * self.scaling
        return delta if result is None else result + delta

    def forward(
        self, x: torch.Tensor, result: torch.Tensor, p: dict[str, torch.Tensor], training: bool
    ) -> torch.Tensor:
        if self.dropout and training and self.kind != "embedding":
            x = F.dropout(x, self.dropout, training=True)
        return self.lora_delta(x, p, result)

    def _fusable(self, x: torch.Tensor, p: dict[str, torch.Tensor], training: bool) -> bool:
        """Whether base + adapter can run as one fused op: a plain frozen `nn.Linear`, no dropout, one dtype."""
        if self.kind != "linear" or (self.dropout and training) or not self.handler.is_plain():
            return False
        weight, bias, A = self.handler.weight_param, self.handler.bias, p["lora_A"]
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            return False  # the fused autograd functions treat the base weight and bias as constants
        return x.dtype == weight.dtype == A.dtype and x.device == weight.device == A.device

    def fused_forward(self, x: torch.Tensor, p: dict[str, torch.Tensor], training: bool) -> torch.Tensor | None:
        if "lora_B_bias" in p or not self._fusable(x, p, training):
            return None
        layer = self.handler.layer
        return LoraLinearFn.apply(x, layer.weight, layer.bias, p["lora_A"], p["lora_B"], self.scaling)

    # ------------------------------------------------------------------ merging
    def delta_weight(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        A, B = p["lora_A"], p["lora_B"]
        cast = A.device.type == "cpu" and A.dtype in (torch.float16, torch.bfloat16)
        if cast:  # CPU half matmuls are slow and imprecise; PEFT upcasts the same way
            A, B = A.float(), B.float()
        if self.kind == "embedding":
            delta = (B @ A).t()
        elif self.kind == "linear":
            delta = B @ A
        else:
            layer = self.handler.layer
            if tuple(layer.weight.shape[2:]) == (1,) * (layer.weight.dim() - 2):
                delta = (B.flatten(1) @ A.flatten(1)).view(layer.weight.shape)
            else:
                delta = self.handler.conv_fn(A.transpose(0, 1), B)
                delta = delta if layer.groups > 1 else delta.transpose(0, 1)
        return delta * self.scaling if not cast else (delta * self.scaling).to(p["lora_A"].dtype)

    def merged_bias(self, bias: torch.Tensor | None, p: dict[str, torch.Tensor], sign: int) -> torch.Tensor | None:
        if "lora_B_bias" not in p:
            return bias
        if bias is None:
            raise ValueError(f"{self.module_name}: cannot merge lora_bias into a base layer that has no bias")
        return bias + sign * self.scaling * p["lora_B_bias"].to(bias.dtype)


def _randn(t: torch.Tensor) -> None:
    t.copy_(torch.randn(t.shape, dtype=t.dtype, device=t.device))


def _uniform_bias(fan_in: int):
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0

    def init(t: torch.Tensor) -> None:
        nn.init.uniform_(t, -bound, bound)

    return init
