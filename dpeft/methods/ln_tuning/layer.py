"""LayerNorm tuning: the adapter is a full copy of a layer's parameters, used instead of the base's.

Meant for normalisation layers; as in HF PEFT, any plain layer (Linear, Conv, Embedding, GPT-2's Conv1D) can be
tuned the same way.

Math:  y = norm(x; weight', bias')  with weight', bias' trainable copies of the base layer's (so it starts as the
identity change). Key names follow HF PEFT: `<norm>.ln_tuning_layers.weight` / `.bias`. Merging writes the copy
into the base layer (and unmerging restores the base values kept at merge time), as PEFT's module swap does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dpeft.methods.base import MethodLayer
from dpeft.methods.ln_tuning.config import LNTuningConfig
from dpeft.quant import BaseHandler
from dpeft.store import ADAPTER, ParamSpec


class NormHandler(BaseHandler):
    """A normalisation layer (LayerNorm, RMSNorm, GroupNorm, ...) with an elementwise `weight` (and `bias`) and no
    buffers: the layers LN tuning adapts. No other method has a form for this kind."""

    kind = "norm"

    @classmethod
    def accepts(cls, layer: nn.Module) -> bool:
        if "Norm" not in type(layer).__name__:  # cheap first: every candidate layer of every method is asked
            return False
        names = {n for n, _ in layer.named_parameters(recurse=False)}
        no_children = not any(True for _ in layer.children())
        no_buffers = not any(True for _ in layer.named_buffers(recurse=False))
        return names in ({"weight"}, {"weight", "bias"}) and no_children and no_buffers

    @property
    def in_features(self) -> int:
        return self.layer.weight.numel()

    @property
    def out_features(self) -> int:
        return self.layer.weight.numel()


class LNTuningLayer(MethodLayer):
    def __init__(self, handler: BaseHandler, config: LNTuningConfig, module_name: str) -> None:
        super().__init__(handler, config, module_name)
        self.names = [n for n, _ in handler.layer.named_parameters(recurse=False)]
        self.specs = [
            ParamSpec(n, tuple(t.shape), ("ln_tuning_layers", ADAPTER, n), _copy_of(handler.layer, n))
            for n, t in handler.layer.named_parameters(recurse=False)
        ]
        self._base_values: dict[str, torch.Tensor] | None = None

    def forward(
        self, x: torch.Tensor, result: torch.Tensor, p: dict[str, torch.Tensor], training: bool
    ) -> torch.Tensor:
        # The copy replaces the base layer: its output is the layer's output (the base result is not used).
        return self._norm(x, p)

    def fused_forward(self, x: torch.Tensor, p: dict[str, torch.Tensor], training: bool) -> torch.Tensor | None:
        """The copy's output alone: the base norm, whose result `forward` would drop, is not computed at all."""
        if x.dtype != p["weight"].dtype:
            return None  # mixed precision: the general path casts
        return self._norm(x, p)

    def _norm(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        layer = self.handler.layer
        if type(layer) is nn.LayerNorm:  # direct call: functional_call's parameter swap costs more than the norm
            return F.layer_norm(x, layer.normalized_shape, p["weight"], p.get("bias"), layer.eps)
        return functional_call(layer, {n: p[n] for n in self.names}, (x,))

    def merge_weight(self, weight: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        layer = self.handler.layer
        self._base_values = {n: getattr(layer, n).detach().clone() for n in self.names}
        # The copy is in the layer's stored layout; merged weights are (out, in, ...) (GPT-2's Conv1D differs).
        return self.handler.logical_layout(p["weight"].detach()).to(weight.dtype)

    def unmerge_weight(self, weight: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        if self._base_values is None:
            raise RuntimeError(f"{self.module_name}: LN-tuning adapter was not merged by this process; cannot unmerge")
        restored = self.handler.logical_layout(self._base_values.pop("weight")).to(weight.dtype)
        if not self._base_values:
            self._base_values = None
        return restored

    def merged_bias(self, bias: torch.Tensor | None, p: dict[str, torch.Tensor], sign: int) -> torch.Tensor | None:
        if bias is None:
            return None
        if sign > 0:
            return p["bias"].detach().to(bias.dtype)
        restored = self._base_values.pop("bias").to(bias.dtype)  # unmerge_weight already took the weight
        self._base_values = None
        return restored

    def delta_weight(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.handler.logical_layout(p["weight"].detach()) - self.handler.weight().detach()


def copyable(layer: nn.Module) -> bool:
    """Whether LN tuning can copy `layer`: a leaf whose parameters are plain float tensors with a `weight`."""
    params = layer._parameters
    return (
        "weight" in params
        and not layer._modules
        and all(type(t) is nn.Parameter and t.is_floating_point() for t in params.values() if t is not None)
    )


def _copy_of(layer: nn.Module, name: str):
    def init(t: torch.Tensor) -> None:
        t.copy_(getattr(layer, name).detach())

    return init
