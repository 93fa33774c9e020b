"""MiSS (formerly Bone) on linear base layers (also quantized ones; not transformers `Conv1D`, as in PEFT).

With W (out, in) cut into r-column slices, the default form adds the block B (r, out) to every slice: the delta
weight is B^T tiled along the columns (the last, partial slice takes B^T's first columns), so the forward is
y + (sum over slices of the padded input) B. ``init_weights="mini"`` stores B as (r, mini_r) and repeats it along
out_features. ``"bat"`` stores one (r, r) block per row slice, B (out/r, r, r), and updates every (r, r) block W_ij
of W to W_ij B_i + B_i + W_ij (delta W_ij B_i + B_i; unmerging inverts I + B_i). Key ``miss_block`` and init
(zeros; kaiming-uniform for ``init_weights=False``) follow PEFT.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dpeft.methods.base import MethodLayer
from dpeft.methods.miss.config import MissConfig
from dpeft.quant import BaseHandler
from dpeft.store import ADAPTER, ParamSpec


def _kaiming(t: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class MissLayer(MethodLayer):
    """One MiSS adapter on one linear base layer, in the variant `init_weights` selects."""

    def __init__(self, handler: BaseHandler, config: MissConfig, module_name: str) -> None:
        super().__init__(handler, config, module_name)
        r, out, fan_in = config.r, handler.out_features, handler.in_features
        if r > fan_in:
            raise ValueError(f"{module_name}: `r` ({r}) must be less than or equal to in_features ({fan_in})")
        self.r, self.mode, self.dropout = r, config.init_weights, config.miss_dropout
        if self.mode == "bat":
            if fan_in % r or out % r:
                raise ValueError(
                    f"{module_name}: the weight ({out}, {fan_in}) must divide into [r, r] = [{r}, {r}] blocks"
                )
            shape, init = (out // r, r, r), None
        elif self.mode == "mini":
            if out % config.mini_r:
                raise ValueError(f"{module_name}: out_features ({out}) must be divisible by mini_r ({config.mini_r})")
            shape, init = (r, config.mini_r), None
        else:
            shape, init = (r, out), (None if self.mode else _kaiming)
        self.specs = [ParamSpec("miss_block", shape, ("miss_block", ADAPTER), init)]

    def _block(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """B as (r, out) for the default and "mini" forms."""
        block = p["miss_block"]
        return block.repeat(1, self.handler.out_features // block.shape[1]) if self.mode == "mini" else block

    def forward(
        self, x: torch.Tensor, result: torch.Tensor, p: dict[str, torch.Tensor], training: bool
    ) -> torch.Tensor:
        if self.mode == "bat":  # PEFT applies no dropout here: the input meets W + delta(W) directly
            return result + F.linear(x, self.delta_weight(p))
        pad = (self.r - x.shape[-1] % self.r) % self.r
        if pad:
            x = F.pad(x, (0, pad))
        if self.dropout and training:
            x = F.dropout(x, self.dropout, training=True)
        summed = x.reshape(*x.shape[:-1], x.shape[-1] // self.r, self.r).sum(dim=-2)
        return result + summed @ self._block(p)

    def _bat_blocks(self, weight: torch.Tensor) -> torch.Tensor:
        """W as (in/r, out/r, r, r): block [j, i] is rows i*r.., columns j*r.. of W."""
        r = self.r
        return weight.reshape(weight.shape[0] // r, r, weight.shape[1] // r, r).permute(2, 0, 1, 3)

    def _from_bat_blocks(self, blocks: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return blocks.permute(1, 2, 0, 3).reshape(shape)

    def delta_weight(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.mode == "bat":
            block = p["miss_block"]
            weight = self.handler.weight().detach().to(block.dtype)
            return self._from_bat_blocks(self._bat_blocks(weight) @ block + block, weight.shape)
        fan_in = self.handler.in_features
        block_t = self._block(p).t()
        return block_t.repeat(1, -(-fan_in // self.r))[:, :fan_in]

    def merge_weight(self, weight: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.mode != "bat":
            return super().merge_weight(weight, p)
        block = p["miss_block"].detach().float()
        merged = self._bat_blocks(weight.float()) @ block + block
        return (weight.float() + self._from_bat_blocks(merged, weight.shape)).to(weight.dtype)

    def unmerge_weight(self, weight: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.mode != "bat":
            return super().unmerge_weight(weight, p)
        block = p["miss_block"].detach().float()
        inverse = torch.inverse(torch.eye(self.r, dtype=torch.float32, device=block.device) + block)
        restored = (self._bat_blocks(weight.float()) - block) @ inverse
        return self._from_bat_blocks(restored, weight.shape).to(weight.dtype)
