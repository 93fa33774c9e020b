"""OFT on nn.Linear (also quantized linears), nn.Conv2d and nn.Embedding base layers.

Math: R = blockdiag(R_1..R_r), each R_i = Cayley(S_i) of a skew-symmetric b x b block S_i whose strictly upper
triangle is a row of the trainable `oft_R` (r, b(b-1)/2) (one shared row with `block_share`). A linear layer sees
the rotated input, y = W (R^T x) + bias (merged: W' = W R^T); a convolution uses W' = W R^T on the weight
flattened to (out, in*k*k); an embedding rotates its output vectors, e = E[ids] R (merged: E' = E R). Key names and
init follow HF PEFT: `oft_R.weight` (`oft_embedding_R.weight` on embeddings), zeros (the identity) or normal(0, 0.1)
with `init_weights=False`.

PEFT 0.21.2's unmerged Conv2d forward unfolds the input into overlapping k x k patches, rotates them and folds them
back, which sums the overlaps: for k > 1 it is not the identity at init and differs from PEFT's own merged weight.
dpeft computes the convolution with W R^T (equal to PEFT's merged model, and to its forward for 1x1 kernels).
"""

from __future__ import annotations

import warnings
from functools import partial

import torch
from torch import nn

from dpeft.methods.oft.config import OFTConfig
from dpeft.methods.oft.rotation import cayley, project_near_identity, rotate_columns, rotate_last, skew_from_upper
from dpeft.methods.oft.weight_form import WeightFormLayer
from dpeft.quant import BaseHandler
from dpeft.store import ADAPTER, ParamSpec


def nearest_divisor(dim: int, value: int) -> int:
    """PEFT's repair of an r / block size that does not divide `dim`: the closest divisor (the lower on a tie)."""
    if value >= dim:
        return dim
    higher = value
    while higher <= dim and dim % higher:
        higher += 1
    lower = value
    while lower > 1 and dim % lower:
        lower -= 1
    return lower if value - lower <= higher - value else higher


def resolve_blocks(dim: int, r: int, block_size: int, module_name: str) -> tuple[int, int]:
    """(number of blocks, block size) for a rotated dimension `dim`, adjusting the given one as PEFT does."""
    if r == 0:
        fixed = nearest_divisor(dim, block_size) if dim % block_size or block_size > dim else block_size
        if fixed != block_size:
            warnings.warn(f"{module_name}: invalid oft_block_size ({block_size}); adjusted to {fixed}", stacklevel=3)
        return dim // fixed, fixed
    fixed = nearest_divisor(dim, r) if dim % r or r > dim else r
    if fixed != r:
        warnings.warn(f"{module_name}: invalid r ({r}); adjusted to {fixed}", stacklevel=3)
    return fixed, dim // fixed


def rotated_dim(handler: BaseHandler, module_name: str, method: str = "OFT") -> int:
    """The dimension an orthogonal method rotates: input features, a conv's in_channels * k * k (weights flattened
    as (out, in*k*k), which needs groups=1, a square kernel and no dilation), or the embedding dimension."""
    if handler.kind == "embedding":
        return handler.out_features
    if handler.kind == "conv2d":
        layer = handler.layer
        k = layer.kernel_size
        if layer.dilation[0] > 1:
            raise ValueError(f"{module_name}: Conv2d with dilation > 1 is not supported by {method}")
        if layer.groups != 1 or k[0] != k[1]:
            raise ValueError(
                f"{module_name}: {method} needs a Conv2d with groups=1 and a square kernel "
                f"(got groups={layer.groups}, kernel_size={tuple(k)}); exclude this module"
            )
        return handler.in_features * k[0] * k[0]
    return handler.in_features


class OFTLayer(WeightFormLayer):
    """One OFT adapter on one base layer."""

    def __init__(self, handler: BaseHandler, config: OFTConfig, module_name: str) -> None:
        super().__init__(handler, config, module_name)
        self.kind = handler.kind
        dim = rotated_dim(handler, module_name)
        self.r, self.block_size = resolve_blocks(dim, config.r, config.oft_block_size, module_name)
        self.neumann, self.terms = config.use_cayley_neumann, config.num_cayley_neumann_terms
        self.transforms_input = self.kind == "linear"
        # Linear layers rotate the input and embeddings the output, one adapter after the other; a convolution's
        # rotation acts on its weight, so several active adapters compose by merging them in order (as merge does).
        self.composes_through_weight = self.kind not in ("linear", "embedding")
        random = not config.init_weights

        def init(t: torch.Tensor) -> None:
            if random:
                nn.init.normal_(t, mean=0.0, std=0.1)
            else:
                t.zero_()

        rows = 1 if config.block_share else self.r
        holder = "oft_embedding_R" if self.kind == "embedding" else "oft_R"
        # COFT: PEFT projects the stored tensor in place before every use (forward and merge); the store does it.
        project = partial(project_near_identity, block=self.block_size, eps=config.eps) if config.coft else None
        shape = (rows, self.block_size * (self.block_size - 1) // 2)
        self.specs = [ParamSpec("oft_R", shape, (holder, ADAPTER, "weight"), init, project=project)]

    def rotation(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """The (r, b, b) rotation blocks, or (1, b, b) with `block_share`."""
        return cayley(skew_from_upper(p["oft_R"], self.block_size), self.neumann, self.terms)

    # ------------------------------------------------------------------ forward
    def transform_input(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return rotate_last(x, self.rotation(p))

    def forward(
        self, x: torch.Tensor, result: torch.Tensor, p: dict[str, torch.Tensor], training: bool
    ) -> torch.Tensor:
        if self.kind == "linear":
            return result  # the base layer already saw the rotated input
        if self.kind == "embedding":
            return rotate_last(result.to(p["oft_R"].dtype), self.rotation(p))
        return self.weight_delta_output(x, result, p, training)

    def fused_forward(self, x: torch.Tensor, p: dict[str, torch.Tensor], training: bool) -> torch.Tensor | None:
        return self.conv_fused(x, p, training)

    # ------------------------------------------------------------------ merging
    def merged(self, weight: torch.Tensor, p: dict[str, torch.Tensor], training: bool = False) -> torch.Tensor:
        """W R^T (E R for an embedding), computed in the adapter's dtype."""
        blocks = self.rotation(p)
        return rotate_columns(weight.to(blocks.dtype), blocks, transpose=self.kind != "embedding").to(weight.dtype)

    def unmerge_weight(self, weight: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        # The Neumann series is only nearly orthogonal: undo with the inverse (in float32), not the transpose.
        blocks = torch.linalg.inv(self.rotation(p).float())
        return rotate_columns(weight.float(), blocks, transpose=self.kind != "embedding").to(weight.dtype)
