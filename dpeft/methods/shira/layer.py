"""SHiRA on linear base layers (nn.Linear; also transformers' Conv1D and quantized linears, which PEFT lacks).

Math:  delta W = scatter(shira_weight at shira_indices) into an (out, in) zero matrix; n = r * (in + out) entries.
The mask is fixed at creation (PEFT's `random_mask`: the first n of a seeded permutation of out * in positions, in
row-major order, or a user `mask_fn`) and saved with the adapter as ``shira_indices`` (2, n) int32, a tensor PEFT
keeps outside its modules: here a store tensor registered under no module (`ParamSpec.attach=False`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpeft.methods.base import MethodLayer
from dpeft.methods.shira.config import ShiraConfig
from dpeft.quant import BaseHandler
from dpeft.store import ADAPTER, ParamSpec


def random_mask_indices(out_features: int, in_features: int, n: int, seed: int | None) -> torch.Tensor:
    """(2, n) row/column indices of PEFT's random mask, in row-major order."""
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
    flat = torch.randperm(out_features * in_features, generator=generator)[:n].sort().values
    return torch.stack([flat // in_features, flat % in_features]).to(torch.int32)


class ShiraLayer(MethodLayer):
    def __init__(self, handler: BaseHandler, config: ShiraConfig, module_name: str) -> None:
        super().__init__(handler, config, module_name)
        self.out_features, self.in_features = handler.out_features, handler.in_features
        n = config.r * (self.in_features + self.out_features)
        if n > self.in_features * self.out_features:
            raise ValueError(
                f"{module_name}: r={config.r} gives {n} SHiRA entries, more than the "
                f"{self.in_features * self.out_features} weights of the base layer; lower r"
            )
        self.scaling = 1.0
        zero = config.init_weights

        def init_weight(t: torch.Tensor) -> None:
            t.copy_(torch.zeros(t.shape) if zero else torch.randn(t.shape))

        def init_indices(t: torch.Tensor) -> None:
            # Only for a new adapter: a load fills the indices from the checkpoint and needs no mask function.
            t.copy_(self._mask_indices(config, handler, n, module_name))

        self.specs = [
            ParamSpec("shira_weight", (n,), ("shira_weight", ADAPTER), init_weight),
            ParamSpec(
                "shira_indices",
                (2, n),
                ("shira_indices", ADAPTER),
                init_indices,
                trainable=False,
                dtype=torch.int32,
                attach=False,
            ),
        ]

    @staticmethod
    def _mask_indices(config: ShiraConfig, handler: BaseHandler, n: int, module_name: str) -> torch.Tensor:
        if config.mask_fn is None and config.mask_type == "random":
            return random_mask_indices(handler.out_features, handler.in_features, n, config.random_seed)
        if config.mask_fn is None:
            raise ValueError(
                f"mask_type={config.mask_type!r} needs a mask function: set `config.mask_fn = fn` with "
                "fn(base_layer, r, **kwargs) -> 0/1 mask of the base weight's shape"
            )
        mask = config.mask_fn(handler.layer, config.r)
        indices = torch.stack(torch.where(mask == 1)).to(torch.int32)
        if indices.shape != (2, n):
            raise ValueError(
                f"{module_name}: the mask function set {indices.shape[1]} entries but SHiRA with r={config.r} needs "
                f"r * (in + out) = {n}"
            )
        return indices.cpu()

    def set_scale(self, scale: float) -> None:
        """PEFT's SHiRA ``set_scale``: delta W becomes scale * scatter(shira_weight) (1.0 at creation; not saved)."""
        self.scaling = scale

    def delta_weight(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        weight = p["shira_weight"]
        rows, cols = p["shira_indices"].long()
        dense = weight.new_zeros(self.out_features, self.in_features)
        return dense.index_put((rows, cols), weight * self.scaling, accumulate=True)

    def fused_forward(self, x: torch.Tensor, p: dict[str, torch.Tensor], training: bool) -> torch.Tensor | None:
        """One GEMM with W + delta W, as PEFT computes it (the delta is a dense matrix here anyway)."""
        w = self.handler.weight_param
        if not (self.handler.kind == "linear" and self.handler.is_plain()) or x.dtype != w.dtype:
            return None  # Conv1D, quantized or mixed-precision bases take the general path
        return F.linear(x, w + self.delta_weight(p).to(w.dtype), self.handler.layer.bias)

    def forward(
        self, x: torch.Tensor, result: torch.Tensor, p: dict[str, torch.Tensor], training: bool
    ) -> torch.Tensor:
        return result + F.linear(x, self.delta_weight(p).to(x.dtype))
