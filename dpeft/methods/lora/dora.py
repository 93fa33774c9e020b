"""DoRA: LoRA whose merged weight is rescaled row-wise to a trained magnitude.

With W the base weight (out, in), D = s * B A and m the magnitude vector, the adapted weight is
m * (W + D) / ||W + D|| with the norm per output row, detached from the graph (DoRA paper, section 4.3, as in PEFT).

The norm never needs W + D: ||W_i + D_i||^2 = ||W_i||^2 + 2 s <(W A^T)_i, B_i> + s^2 B_i (A A^T) B_i^T, where
||W_i||^2 is cached while W is unchanged and the rest is rank-r work. In forward, with t = y + s B(A(x)) the
LoRA output and b the base bias, the DoRA output is g * (t - b) + b with g = m / norm: one extra elementwise pass.
Embeddings take norms over the vocabulary per embedding dimension (PEFT's orientation) and have no bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpeft.methods.lora.config import LoraConfig
from dpeft.methods.lora.fused import DoraLinearFn
from dpeft.methods.lora.layer import LoraLayer
from dpeft.quant import BaseHandler
from dpeft.store import ADAPTER, ParamSpec


class DoraLayer(LoraLayer):
    def __init__(self, handler: BaseHandler, config: LoraConfig, module_name: str) -> None:
        super().__init__(handler, config, module_name)
        if self.kind.startswith("conv") and handler.layer.groups > 1:
            raise ValueError(f"{module_name}: DoRA does not support grouped convolutions (groups > 1)")
        out = handler.out_features
        if self.kind.startswith("conv"):
            shape = (1, out) + (1,) * (handler.layer.weight.dim() - 2)
        else:
            shape = (out,)
        # The magnitude starts at the norm of the initial adapted weight, which needs A and B: `initial_magnitude`
        # fills it once the store has allocated them.
        self.specs.append(
            ParamSpec("magnitude", shape, ("lora_magnitude_vector", ADAPTER, "weight"), saved="lora_magnitude_vector")
        )
        self._row_norm2: tuple[tuple[int, int], torch.Tensor] | None = None
        self._merged_norm: torch.Tensor | None = None

    def after_allocation(self, p: dict[str, torch.Tensor]) -> None:
        """Set the magnitude to the norm of the initial W + s B A (called once after allocation)."""
        with torch.no_grad():
            p["magnitude"].copy_(self.weight_norm(p).view_as(p["magnitude"]))

    # ------------------------------------------------------------------ norms
    def _base_matrix(self) -> torch.Tensor:
        """The base weight as a matrix whose rows are what DoRA normalises."""
        w = self.handler.weight()
        return w.t() if self.kind == "embedding" else w.reshape(w.shape[0], -1)

    def _factors(self, p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as matrices with D = s * B @ A in `_base_matrix` orientation."""
        A, B = p["lora_A"], p["lora_B"]
        return A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1)

    def _cached_row_norm2(self, w: torch.Tensor) -> torch.Tensor:
        key = (w.data_ptr(), self.handler.weight_param._version)
        if self._row_norm2 is None or self._row_norm2[0] != key:
            self._row_norm2 = (key, w.float().pow(2).sum(1))
        return self._row_norm2[1]

    @torch.no_grad()
    def weight_norm(self, p: dict[str, torch.Tensor], weight: torch.Tensor | None = None) -> torch.Tensor:
        """Row norms of W + s B A (W: the current base weight unless `weight` is given), float32, detached."""
        w = self._base_matrix() if weight is None else weight
        A, B = (t.detach().float() for t in self._factors(p))
        wf = w.float()
        row2 = self._cached_row_norm2(w) if weight is None else wf.pow(2).sum(1)
        s = self.scaling
        cross = ((wf @ A.t()) * B).sum(1)
        lora2 = ((B @ (A @ A.t())) * B).sum(1)
        return (row2 + 2 * s * cross + s * s * lora2).clamp_min(0).sqrt()

    def _gain(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        mag = p["magnitude"]
        return mag / self.weight_norm(p).to(mag.dtype).view_as(mag)

    # ------------------------------------------------------------------ forward
    def forward(
        self, x: torch.Tensor, result: torch.Tensor, p: dict[str, torch.Tensor], training: bool
    ) -> torch.Tensor:
        g = self._gain(p)
        if self.kind == "embedding":
            return g * self.lora_delta(x, p, result)
        bias = self.handler.bias
        if self.dropout and training:
            # The base branch sees the undropped input and the DoRA terms the dropped one, as in PEFT.
            x = F.dropout(x, self.dropout, training=True)
            base = self._base_no_bias(x)
            return result + (g - 1) * base + g * self.lora_delta(x, p, None)
        t = self.lora_delta(x, p, result)
        if bias is None:
            return g * t
        b = bias.view((1, -1) + (1,) * (t.dim() - 2)) if self.kind.startswith("conv") else bias
        return torch.addcmul(b, g, t - b)

    def fused_forward(self, x: torch.Tensor, p: dict[str, torch.Tensor], training: bool) -> torch.Tensor | None:
        if "lora_B_bias" in p or not self._fusable(x, p, training) or p["magnitude"].dtype != x.dtype:
            return None
        g = self._gain(p)
        layer = self.handler.layer
        return DoraLinearFn.apply(x, layer.weight, layer.bias, p["lora_A"], p["lora_B"], g, self.scaling)

    def _base_no_bias(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind.startswith("conv"):
            return self.handler.conv(x, self.handler.weight())
        return F.linear(x, self.handler.weight().to(x.dtype))

    # ------------------------------------------------------------------ merging
    def _factor_view(self, g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.kind == "embedding":
            return g.view(1, -1)
        return g.reshape((-1,) + (1,) * (weight.dim() - 1))

    def merge_weight(self, weight: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        delta = self.delta_weight(p).to(weight.dtype)
        matrix = weight.t() if self.kind == "embedding" else weight.reshape(weight.shape[0], -1)
        norm = self.weight_norm(p, matrix)
        self._merged_norm = norm  # unmerging needs the norm of the weight before this merge
        g = p["magnitude"].detach().reshape(-1).float() / norm
        return (self._factor_view(g, weight) * (weight + delta).float()).to(weight.dtype)

    def unmerge_weight(self, weight: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        if self._merged_norm is None:
            raise RuntimeError(f"{self.module_name}: DoRA adapter was not merged by this process; cannot unmerge")
        g = p["magnitude"].detach().reshape(-1).float() / self._merged_norm
        self._merged_norm = None
        delta = self.delta_weight(p).to(weight.dtype)
        return (weight.float() / self._factor_view(g, weight) - delta.float()).to(weight.dtype)
