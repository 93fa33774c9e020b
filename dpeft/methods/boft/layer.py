"""BOFT on nn.Linear (also quantized linears) and nn.Conv2d base layers.

Math: M = B_{m-1} ... B_1 B_0 with butterfly factors B_k = P_k blockdiag(R_k1..R_kD) P_k^T, each R = Cayley of the
skew part (A - A^T) / 2 of a trainable b x b block (`boft_R`, (m, D, b, b)); `boft_s` scales output features. A
linear layer computes y = s * (W M^T x) + bias (merged: W' = s * W M^T); a convolution uses that W' on the weight
flattened to (out, in*k*k). Key names and init follow HF PEFT: `boft_R` zeros and `boft_s` ones (the identity),
or normal(0, 0.1) and normal(1, 0.1) with `init_weights=False`. `boft_dropout` sets a share of one factor's blocks
to the identity in training, drawing PEFT's random numbers in PEFT's order.
"""

from __future__ import annotations

import torch
from torch import nn

from dpeft.methods.boft.butterfly import butterfly_blocks, factor_permutations
from dpeft.methods.boft.config import BOFTConfig
from dpeft.methods.oft.layer import rotated_dim
from dpeft.methods.oft.rotation import cayley, rotate_last
from dpeft.methods.oft.weight_form import WeightFormLayer
from dpeft.quant import BaseHandler
from dpeft.store import ADAPTER, ParamSpec


class BOFTLayer(WeightFormLayer):
    """One BOFT adapter on one base layer."""

    # Several active adapters multiply, as in PEFT: the weight merged with each in the active order.
    composes_through_weight = True

    def __init__(self, handler: BaseHandler, config: BOFTConfig, module_name: str) -> None:
        super().__init__(handler, config, module_name)
        self.kind = handler.kind
        self.dim = rotated_dim(handler, module_name, "BOFT")
        factors = config.boft_n_butterfly_factor
        self.block_num, self.block_size = butterfly_blocks(
            self.dim, config.boft_block_size, config.boft_block_num, factors, module_name
        )
        self.perms = factor_permutations(self.dim, self.block_num, self.block_size, factors)
        self.dropout = config.boft_dropout
        random = not config.init_weights

        def init_r(t: torch.Tensor) -> None:
            nn.init.normal_(t, 0.0, 0.1) if random else t.zero_()

        def init_s(t: torch.Tensor) -> None:
            nn.init.normal_(t, 1.0, 0.1) if random else t.fill_(1.0)

        out = handler.out_features
        self.specs = [
            ParamSpec(
                "boft_R", (factors, self.block_num, self.block_size, self.block_size), ("boft_R", ADAPTER), init_r
            ),
            ParamSpec("boft_s", (out, 1) if self.kind == "linear" else (1, out), ("boft_s", ADAPTER), init_s),
        ]

    # ------------------------------------------------------------------ the rotation
    def _blocks(self, p: dict[str, torch.Tensor], training: bool) -> torch.Tensor:
        """(m, D, b, b) orthogonal blocks, with block dropout in training."""
        a = p["boft_R"]
        m, d, b, _ = a.shape
        blocks = cayley((0.5 * (a - a.transpose(-2, -1))).reshape(m * d, b, b), False, 0).view(m, d, b, b)
        if training and self.dropout > 0:
            # PEFT's draws, in its order: the factor, then a shuffle of which blocks become the identity.
            factor = int(torch.randint(0, m, (1,)).item())
            n_drop = int(self.dropout * d)
            picked = torch.cat([torch.ones(n_drop), torch.zeros(d - n_drop)])[torch.randperm(d)]
            mask = torch.zeros(m, d, 1, 1)
            mask[factor] = picked.view(d, 1, 1)
            mask = mask.to(a.device, a.dtype)
            blocks = (1 - mask) * blocks + mask * torch.eye(b, device=a.device, dtype=a.dtype)
        return blocks

    def _rotate(self, x: torch.Tensor, blocks: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """x @ M along the last dim (x @ B_{m-1} @ ... @ B_0, each B_k = P_k blockdiag(R_k) P_k^T), or x @ M^T
        (x @ B_0^T @ ... @ B_{m-1}^T) with `transpose`; M itself is never formed."""
        order = range(blocks.shape[0]) if transpose else reversed(range(blocks.shape[0]))
        for k in order:
            factor = blocks[k].transpose(-2, -1) if transpose else blocks[k]
            if self.perms[k] is None:
                x = rotate_last(x, factor)
                continue
            perm, inverse = (t.to(x.device) for t in self.perms[k])
            x = rotate_last(x.index_select(-1, inverse), factor).index_select(-1, perm)
        return x

    def merged(self, weight: torch.Tensor, p: dict[str, torch.Tensor], training: bool = False) -> torch.Tensor:
        """s * (W M^T), with W flattened to (out, dim), in the adapter's dtype."""
        blocks = self._blocks(p, training)
        w = weight.to(blocks.dtype).reshape(weight.shape[0], -1)
        rotated = self._rotate(w, blocks, transpose=True)
        return (rotated * p["boft_s"].reshape(-1, 1)).reshape(weight.shape).to(weight.dtype)

    # ------------------------------------------------------------------ forward
    def fused_forward(self, x: torch.Tensor, p: dict[str, torch.Tensor], training: bool) -> torch.Tensor | None:
        """Linear: the base layer on the rotated input, then the output scale (M is never formed). Conv: one
        convolution with the merged weight."""
        if self.kind == "conv2d":
            return self.conv_fused(x, p, training)
        dtype = p["boft_R"].dtype
        result = self.handler.layer(self._rotate(x.to(dtype), self._blocks(p, training)).to(x.dtype))
        return self._scale(result, p).to(result.dtype)

    def _scale(self, result: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """s * (y - bias) + bias: the scale applies to the weight's part of the output, not to the bias. Written as
        s * y + (1 - s) * bias, which is exactly y at s = 1 (the identity init)."""
        s = p["boft_s"].reshape(-1)
        bias = self.handler.bias
        out = result.to(s.dtype) * s
        return out if bias is None else out + (1 - s) * bias.to(s.dtype)

    def forward(
        self, x: torch.Tensor, result: torch.Tensor, p: dict[str, torch.Tensor], training: bool
    ) -> torch.Tensor:
        # The general path (several adapters, a mixed batch, hooked bases) adds this adapter's change of the output.
        return self.weight_delta_output(x, result, p, training)

    # ------------------------------------------------------------------ merging
    def unmerge_weight(self, weight: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        # W = (W' / s) M: M is exactly orthogonal (exact Cayley), so M^T inverts it.
        blocks = self._blocks(p, False)
        w = weight.to(blocks.dtype).reshape(weight.shape[0], -1) / p["boft_s"].reshape(-1, 1)
        return self._rotate(w, blocks).reshape(weight.shape).to(weight.dtype)
