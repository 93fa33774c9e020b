"""HRA on nn.Linear (also quantized linears) and nn.Conv2d base layers.

Math: H = H_1 H_2 ... H_r with Householder reflections H_i = I - 2 u_i u_i^T of the unit columns u_i of the trainable
`hra_u` (dim, r); with `apply_GS` the columns are first orthonormalised (Gram-Schmidt) and H = I - 2 U U^T. The
merged weight is W' = W H (a convolution's weight flattened to (out, in*k*k)). A linear layer sees the input
H^T x = H_r ... H_1 x, computed in the compact WY form H = I - U T U^T (two skinny products), so H is never
formed. Key name and init follow HF PEFT: `hra_u`, kaiming-uniform columns in equal pairs (H = I) for an even r,
plain kaiming otherwise.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from dpeft.methods.hra.config import HRAConfig
from dpeft.methods.oft.layer import rotated_dim
from dpeft.methods.oft.weight_form import WeightFormLayer
from dpeft.quant import BaseHandler
from dpeft.store import ADAPTER, ParamSpec


def _kaiming(t: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def _paired_kaiming(t: torch.Tensor) -> None:
    """Kaiming columns, each repeated twice: every reflection cancels its twin, so H starts as the identity."""
    half = torch.empty(t.shape[0], t.shape[1] // 2, dtype=t.dtype, device=t.device)
    _kaiming(half)
    t.copy_(half.repeat_interleave(2, dim=1))


class HRALayer(WeightFormLayer):
    """One HRA adapter on one base layer."""

    # Several active adapters multiply, as in PEFT: the weight merged with each in the active order.
    composes_through_weight = True

    def __init__(self, handler: BaseHandler, config: HRAConfig, module_name: str) -> None:
        super().__init__(handler, config, module_name)
        self.kind = handler.kind
        self.r, self.apply_gs = config.r, config.apply_GS
        self.transforms_input = self.kind == "linear"
        dim = rotated_dim(handler, module_name, "HRA")
        init = _kaiming
        if config.init_weights and self.r % 2:
            warnings.warn(
                f"{module_name}: HRA's symmetric (identity) init needs an even r, got {self.r}", stacklevel=3
            )
        elif config.init_weights:
            init = _paired_kaiming
        self.specs = [ParamSpec("hra_u", (dim, self.r), ("hra_u", ADAPTER), init)]

    def _vectors(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """The (dim, r) unit reflection vectors (orthonormal with `apply_GS`)."""
        u = p["hra_u"]
        if not self.apply_gs:
            return u / u.norm(dim=0)
        basis: list[torch.Tensor] = []
        for i in range(self.r):
            v = u[:, i]
            for b in basis:  # Gram-Schmidt against the vectors already kept, in PEFT's order
                v = v - (b @ v) * b
            basis.append(v / v.norm())
        return torch.stack(basis, dim=1)

    def _wy_factor(self, u: torch.Tensor) -> torch.Tensor:
        """T (r, r) of the compact WY form H = H_1 ... H_r = I - U T U^T (T = 2I for orthonormal columns).

        Appending a reflection I - 2 v v^T on the right gives T' = [[T, -2 T U^T v], [0, 2]], so T comes from the
        r x r Gram matrix alone and H is applied with two skinny products instead of r passes over the rows."""
        r = u.shape[1]
        if self.apply_gs:
            return 2.0 * torch.eye(r, dtype=u.dtype, device=u.device)
        gram = u.T @ u
        t = gram.new_full((1, 1), 2.0)
        for k in range(1, r):
            column = -2.0 * t @ gram[:k, k : k + 1]
            bottom = torch.cat([gram.new_zeros(1, k), gram.new_full((1, 1), 2.0)], dim=1)
            t = torch.cat([torch.cat([t, column], dim=1), bottom], dim=0)
        return t

    def _reflect(self, rows: torch.Tensor, u: torch.Tensor, transpose: bool) -> torch.Tensor:
        """rows @ H, or rows @ H^T (= rows @ H^-1) with `transpose`, along the last dim; H is never formed."""
        t = self._wy_factor(u)
        return rows - ((rows @ u) @ (t.T if transpose else t)) @ u.T

    # ------------------------------------------------------------------ forward
    def transform_input(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._reflect(x, self._vectors(p), transpose=True)

    def forward(
        self, x: torch.Tensor, result: torch.Tensor, p: dict[str, torch.Tensor], training: bool
    ) -> torch.Tensor:
        if self.kind == "linear":
            return result  # the base layer already saw H^T x
        return self.weight_delta_output(x, result, p, training)

    def fused_forward(self, x: torch.Tensor, p: dict[str, torch.Tensor], training: bool) -> torch.Tensor | None:
        return self.conv_fused(x, p, training)

    # ------------------------------------------------------------------ merging
    def merged(self, weight: torch.Tensor, p: dict[str, torch.Tensor], training: bool = False) -> torch.Tensor:
        u = self._vectors(p)
        rows = weight.to(u.dtype).reshape(weight.shape[0], -1)
        return self._reflect(rows, u, transpose=False).reshape(weight.shape).to(weight.dtype)

    def unmerge_weight(self, weight: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        u = self._vectors(p)
        rows = weight.to(u.dtype).reshape(weight.shape[0], -1)
        return self._reflect(rows, u, transpose=True).reshape(weight.shape).to(weight.dtype)
