"""DeLoRA on nn.Linear (also quantized linears) base layers.

Math:  delta W = B diag(lambda / r / (|A_i| |B^i|)) A  diag(w_norm)  where |A_i| are the row norms of A (r, in) and
|B^i| the column norms of B (out, r) (each clamped at 1e-4), `delora_lambda` a trainable scalar bound, and
`delora_w_norm` the base weight's column norms frozen at creation. So each rank-1 term has norm lambda / r before the
column scaling. Key names and init follow HF PEFT: `delora_A` kaiming, `delora_B` zeros (kaiming with
`init_weights=False`), `delora_lambda` (1,) filled with the config value, `delora_w_norm` a saved buffer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dpeft.methods.base import MethodLayer
from dpeft.methods.delora.config import DeloraConfig
from dpeft.methods.lora.layer import pattern_value
from dpeft.quant import BaseHandler
from dpeft.store import ADAPTER, ParamSpec

_NORM_FLOOR = 1e-4


def _kaiming(t: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class DeloraLayer(MethodLayer):
    """One DeLoRA adapter on one linear base layer."""

    def __init__(self, handler: BaseHandler, config: DeloraConfig, module_name: str) -> None:
        super().__init__(handler, config, module_name)
        self.r = pattern_value(config.rank_pattern, module_name, config.r)
        if self.r <= 0:
            raise ValueError(f"{module_name}: r must be a positive integer, got {self.r}")
        lam = float(pattern_value(config.lambda_pattern, module_name, config.delora_lambda))
        self.dropout = config.module_dropout
        out, inp = handler.out_features, handler.in_features

        def init_lambda(t: torch.Tensor) -> None:
            t.fill_(lam)

        def init_w_norm(t: torch.Tensor) -> None:
            # The base weight's column norms when the adapter is created (dequantized for quantized bases).
            t.copy_(handler.weight().detach().float().norm(dim=0))

        # In PEFT's init order (the same seed gives the same tensors): A, then B.
        self.specs = [
            ParamSpec("delora_A", (self.r, inp), ("delora_A", ADAPTER), _kaiming),
            ParamSpec("delora_B", (out, self.r), ("delora_B", ADAPTER), None if config.init_weights else _kaiming),
            ParamSpec("delora_lambda", (1,), ("delora_lambda", ADAPTER), init_lambda),
            ParamSpec("delora_w_norm", (inp,), ("delora_w_norm", ADAPTER), init_w_norm, trainable=False, buffer=True),
        ]

    def _scaling(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """(r,) lambda / r / (|A_i| |B^i|)."""
        a_norm = p["delora_A"].norm(dim=1).clamp(min=_NORM_FLOOR)
        b_norm = p["delora_B"].norm(dim=0).clamp(min=_NORM_FLOOR)
        return p["delora_lambda"] / self.r / (a_norm * b_norm)

    def forward(
        self, x: torch.Tensor, result: torch.Tensor, p: dict[str, torch.Tensor], training: bool
    ) -> torch.Tensor:
        if training and self.dropout > 0:
            x = F.dropout(x, self.dropout, training=True)
        h = F.linear(x * p["delora_w_norm"], p["delora_A"]) * self._scaling(p)
        return result + F.linear(h, p["delora_B"]).to(result.dtype)

    def delta_weight(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return (p["delora_B"] * self._scaling(p)) @ p["delora_A"] * p["delora_w_norm"]
