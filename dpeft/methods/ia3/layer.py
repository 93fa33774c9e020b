"""(IA)^3 on linear (incl. transformers `Conv1D`), Conv2d and Conv3d base layers.

Math, with l the learned vector:  y * l  on ordinary targets (l has one entry per output feature and also scales
the bias when merged), and  base(x * l)  on `feedforward_modules` (one entry per input feature; merging scales
the weight's input columns). Key name and shapes follow HF PEFT: `ia3_l` is (out, 1) / (1, in) on linear layers
and (1, C, 1, 1[, 1]) on convolutions; it starts at 1 (the identity) unless `init_ia3_weights=False` (normal).
"""

from __future__ import annotations

import torch

from dpeft.methods.base import MethodLayer
from dpeft.methods.ia3.config import IA3Config
from dpeft.quant import BaseHandler
from dpeft.store import ADAPTER, ParamSpec


def _ones(t: torch.Tensor) -> None:
    t.fill_(1.0)


def _randn(t: torch.Tensor) -> None:
    t.copy_(torch.randn(t.shape, dtype=t.dtype, device=t.device))


class IA3Layer(MethodLayer):
    """One (IA)^3 vector on one base layer."""

    def __init__(self, handler: BaseHandler, config: IA3Config, module_name: str) -> None:
        super().__init__(handler, config, module_name)
        self.kind = handler.kind
        self.is_feedforward = config.is_feedforward(module_name)
        self.transforms_input = self.is_feedforward
        n = handler.in_features if self.is_feedforward else handler.out_features
        if self.kind == "linear":
            shape = (1, n) if self.is_feedforward else (n, 1)
        else:
            shape = (1, n) + (1,) * (handler.layer.weight.dim() - 2)
        init = _ones if config.init_ia3_weights else _randn
        self.specs = [ParamSpec("ia3_l", shape, ("ia3_l", ADAPTER), init)]

    def _vector(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """l shaped to broadcast over the feature dim of activations (last for linear, 1 for convs)."""
        return p["ia3_l"].flatten() if self.kind == "linear" else p["ia3_l"]

    def transform_input(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return x * self._vector(p)

    def fused_forward(self, x: torch.Tensor, p: dict[str, torch.Tensor], training: bool) -> torch.Tensor | None:
        """Base call and scaling in one step, without the wrapper's general per-adapter loop."""
        l = p["ia3_l"]  # noqa: E741
        if x.dtype != l.dtype:
            return None  # mixed precision: the general path casts
        if self.is_feedforward:
            return self.handler.layer(x * self._vector(p))
        return self.handler.layer(x) * self._vector(p)

    def forward(
        self, x: torch.Tensor, result: torch.Tensor, p: dict[str, torch.Tensor], training: bool
    ) -> torch.Tensor:
        if self.is_feedforward:
            return result  # the input was already scaled before the base layer ran
        return result * self._vector(p).to(result.dtype)

    # ------------------------------------------------------------------ merging
    def _weight_scale(self, weight: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """l broadcastable against the (out, in, ...) weight: rows for output scaling, columns for input scaling."""
        l = p["ia3_l"].detach().flatten().float()  # noqa: E741
        trailing = (1,) * (weight.dim() - 2)
        if not self.is_feedforward:
            return l.view(-1, 1, *trailing)
        groups = getattr(self.handler.layer, "groups", 1) if self.kind != "linear" else 1
        if groups == 1:
            return l.view(1, -1, *trailing)
        # Grouped conv: weight[o, j] reads input channel (group of o) * in_per_group + j.
        out, in_per_group = weight.shape[0], weight.shape[1]
        per_group = l.view(groups, 1, in_per_group).expand(groups, out // groups, in_per_group)
        return per_group.reshape(out, in_per_group, *trailing)

    def merge_weight(self, weight: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return (weight.float() * self._weight_scale(weight, p)).to(weight.dtype)

    def unmerge_weight(self, weight: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return (weight.float() / self._weight_scale(weight, p)).to(weight.dtype)

    def delta_weight(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        weight = self.handler.weight().detach()
        return self.merge_weight(weight, p) - weight

    def merged_bias(self, bias: torch.Tensor | None, p: dict[str, torch.Tensor], sign: int) -> torch.Tensor | None:
        if bias is None or self.is_feedforward:
            return bias  # input scaling leaves the bias alone
        l = p["ia3_l"].detach().flatten().float()  # noqa: E741
        scaled = bias.float() * l if sign > 0 else bias.float() / l
        return scaled.to(bias.dtype)
