"""AdaLoRA's SVD-form layer on linear (incl. transformers `Conv1D`, quantized linears) and Conv2d base layers.

Math, for input x and base output y:  y + (x (A * E)^T B^T) * s / (ranknum + 1e-5), with A (r, in) the right
singular vectors, E (r, 1) the singular values, B (out, r) the left ones, s = lora_alpha (r when lora_alpha is 0)
and ranknum the initial rank `init_r` (a frozen, unsaved parameter, as in PEFT; it never changes, also when the
rank pattern prunes triplets). Conv2d flattens A over (in, kh, kw) and runs the base convolution with the delta
kernel. Key names (``lora_A``, ``lora_E``, ``lora_B`` as ParameterDict entries; ``ranknum`` unsaved) and init
(random draws for A, E, B, ranknum, then E = 0 and A, B ~ N(0, 0.02)) follow PEFT, in PEFT's order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpeft.methods.adalora.config import AdaLoraConfig
from dpeft.methods.base import MethodLayer
from dpeft.quant import BaseHandler
from dpeft.store import ADAPTER, ParamSpec


def _randn(t: torch.Tensor) -> None:
    # PEFT allocates every tensor with torch.randn before (maybe) re-initialising it: draw the same numbers.
    t.copy_(torch.randn(t.shape, dtype=t.dtype, device=t.device))


class AdaLoraLayer(MethodLayer):
    """One AdaLoRA adapter on one base layer; its rank is `init_r`, or what the config's rank pattern kept."""

    def __init__(self, handler: BaseHandler, config: AdaLoraConfig, module_name: str) -> None:
        super().__init__(handler, config, module_name)
        self.kind = handler.kind
        if self.kind == "conv2d" and handler.layer.groups > 1:
            raise ValueError(
                f"{module_name}: AdaLoRA does not support grouped convolutions (groups > 1), nor does PEFT"
            )
        kept = config.kept_triplets(module_name)
        self.r = config.init_r if kept is None else sum(kept)
        self.ranknum = float(config.init_r)
        self.scaling = config.lora_alpha if config.lora_alpha > 0 else float(config.init_r)
        self.dropout = config.lora_dropout
        fan_in = handler.in_features
        if self.kind == "conv2d":
            kh, kw = handler.layer.kernel_size
            fan_in *= kh * kw
        ranknum = self.ranknum

        def fill_ranknum(t: torch.Tensor) -> None:
            _randn(t)
            t.fill_(ranknum)

        self.specs = [
            ParamSpec("lora_A", (self.r, fan_in), ("lora_A", ADAPTER), _randn),
            ParamSpec("lora_E", (self.r, 1), ("lora_E", ADAPTER), _randn),
            ParamSpec("lora_B", (handler.out_features, self.r), ("lora_B", ADAPTER), _randn),
            ParamSpec("ranknum", (1,), ("ranknum", ADAPTER), fill_ranknum, trainable=False, persistent=False),
        ]

    def after_allocation(self, p: dict[str, torch.Tensor]) -> None:
        """PEFT's `reset_lora_parameters` (when `init_lora_weights`): E = 0, then A and B ~ N(0, 0.02)."""
        if self.config.init_lora_weights:
            with torch.no_grad():
                p["lora_E"].zero_()
                p["lora_A"].normal_(0.0, 0.02)
                p["lora_B"].normal_(0.0, 0.02)

    def _factor(self) -> float:
        return self.scaling / (self.ranknum + 1e-5)

    def forward(
        self, x: torch.Tensor, result: torch.Tensor, p: dict[str, torch.Tensor], training: bool
    ) -> torch.Tensor:
        if self.dropout and training:
            x = F.dropout(x, self.dropout, training=True)  # drawn even at rank 0, as PEFT does
        if self.r == 0:  # every triplet pruned by the rank pattern
            return result
        if self.kind == "conv2d":
            return result + self.handler.conv(x, self._kernel(p))
        hidden = F.linear(x, p["lora_A"] * p["lora_E"])
        if result.dtype == hidden.dtype and result.is_contiguous():
            # One GEMM that also accumulates into the base output: no separate delta tensor or add pass.
            flat = torch.addmm(
                result.reshape(-1, result.shape[-1]), hidden.reshape(-1, self.r), p["lora_B"].t(), alpha=self._factor()
            )
            return flat.view(result.shape)
        return result + F.linear(hidden, p["lora_B"]) * self._factor()

    def _kernel(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return (p["lora_B"] @ (p["lora_A"] * p["lora_E"]) * self._factor()).reshape(self.handler.layer.weight.shape)

    def delta_weight(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.kind == "conv2d":
            return self._kernel(p)
        return p["lora_B"] @ (p["lora_A"] * p["lora_E"]) * self._factor()
