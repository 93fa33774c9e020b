"""FourierFT on linear base layers (nn.Linear and transformers' Conv1D).

Math:  delta W = scaling * Re(IDFT2(S))  where S is an (out, in) matrix, zero except at `n_frequency` fixed
positions that hold the trainable spectrum. The positions are the first n of a permutation of out*in drawn from
`random_loc_seed` (not saved: derived from the config, as in PEFT). Key name and init follow HF PEFT:
`fourierft_spectrum` (n,), normal (zero with `init_weights=True`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpeft.methods.base import MethodLayer
from dpeft.methods.fourierft.config import FourierFTConfig
from dpeft.quant import BaseHandler
from dpeft.store import ADAPTER, ParamSpec


def spectral_positions(out_features: int, in_features: int, n: int, seed: int) -> torch.Tensor:
    """(2, n) row/column indices of the trainable spectral entries: PEFT's seeded permutation, so they match."""
    flat = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([flat // in_features, flat % in_features])


class FourierFTLayer(MethodLayer):
    def __init__(self, handler: BaseHandler, config: FourierFTConfig, module_name: str) -> None:
        super().__init__(handler, config, module_name)
        self.out_features, self.in_features = handler.out_features, handler.in_features
        n = config.n_frequency_for(module_name)
        if n <= 0 or n > self.out_features * self.in_features:
            raise ValueError(
                f"{module_name}: n_frequency must be between 1 and in_features * out_features = "
                f"{self.in_features * self.out_features}, got {n}"
            )
        self.scaling = config.scaling
        self.positions = spectral_positions(self.out_features, self.in_features, n, config.random_loc_seed)
        zero = config.init_weights

        def init(t: torch.Tensor) -> None:
            # Drawn even when zeroed next, as PEFT does, so the same seed gives PEFT's tensors in every layer.
            t.copy_(torch.randn(t.shape, dtype=t.dtype, device=t.device))
            if zero:
                t.zero_()

        self.specs = [ParamSpec("spectrum", (n,), ("fourierft_spectrum", ADAPTER), init)]

    def delta_weight(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        spectrum = p["spectrum"]
        rows, cols = self.positions.to(spectrum.device)
        dense = torch.zeros(self.out_features, self.in_features, device=spectrum.device)
        dense = dense.index_put((rows, cols), spectrum.float())
        return (torch.fft.ifft2(dense).real * self.scaling).to(spectrum.dtype)

    def fused_forward(self, x: torch.Tensor, p: dict[str, torch.Tensor], training: bool) -> torch.Tensor | None:
        """One GEMM with W + delta W instead of two (the dense delta weight is built anyway)."""
        w = self.handler.weight_param
        plain_linear = self.handler.kind == "linear" and self.handler.is_plain()
        if not plain_linear or not (x.dtype == w.dtype == p["spectrum"].dtype):
            return None  # Conv1D, quantized or mixed-precision bases take the general path
        return F.linear(x, w + self.delta_weight(p), self.handler.layer.bias)

    def forward(
        self, x: torch.Tensor, result: torch.Tensor, p: dict[str, torch.Tensor], training: bool
    ) -> torch.Tensor:
        return result + F.linear(x, self.delta_weight(p))
