"""C3A on linear base layers (nn.Linear; also transformers' Conv1D and quantized linears, which PEFT lacks).

Math, with blocks of size b, the input split into N = in / b blocks x_n and the output into M = out / b blocks:
  y_m[t] = 1/in * sum_n sum_l w[m, n, l] * x_n[(t + l) mod b]
a block-circulant delta weight (a circular cross-correlation per block pair), computed in float32 through real FFTs:
y_m = irfft(sum_n conj(rfft(w_mn)) * rfft(x_n)). `c3a_kernel` (M, N, b) is the one tensor, as in PEFT; its init is
xavier-uniform by default (zeros, the identity, with `init_weights=True`).
"""

from __future__ import annotations

import math

import torch

from dpeft.methods.base import MethodLayer
from dpeft.methods.c3a.config import C3AConfig
from dpeft.quant import BaseHandler
from dpeft.store import ADAPTER, ParamSpec


def _kernel_init(init_weights: bool | str, fan_in: int, fan_out: int):
    """PEFT's kernel inits; random values are drawn in float32 on the CPU (as PEFT's kernel is created there)."""
    if init_weights is True:
        return None  # zeros: the identity
    if init_weights == "gaussian":
        return lambda t: t.copy_(torch.empty(t.shape).normal_())
    if init_weights == "kaiming_uniform":
        bound = 1.0 * math.sqrt(1.0 / float(fan_in))
    else:  # "xavier_uniform" or False
        bound = math.sqrt(3.0) * (1.0 * math.sqrt(2.0 / float(fan_in + fan_out)))
    return lambda t: t.copy_(torch.empty(t.shape).uniform_(-bound, bound))


def block_circular(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """sum_n corr(w[m, n], x_n) for every output block m, in float32 (x: (..., N * b), kernel: (M, N, b))."""
    m, n, b = kernel.shape
    spectrum_x = torch.fft.rfft(x.float().reshape(*x.shape[:-1], n, b))
    spectrum_w = torch.fft.rfft(kernel.float()).conj()
    mixed = torch.einsum("...nk,mnk->...mk", spectrum_x, spectrum_w)
    return torch.fft.irfft(mixed, n=b).reshape(*x.shape[:-1], m * b)


def circulant_matrix(kernel: torch.Tensor) -> torch.Tensor:
    """The (M * b, N * b) matrix of `block_circular`: block (m, n) holds w[m, n, (s - t) mod b] at row t, column s."""
    m, n, b = kernel.shape
    t = torch.arange(b, device=kernel.device)
    index = (t[None, :] - t[:, None]) % b  # [t, s] -> (s - t) mod b
    return kernel[:, :, index].permute(0, 2, 1, 3).reshape(m * b, n * b)


class C3ALayer(MethodLayer):
    def __init__(self, handler: BaseHandler, config: C3AConfig, module_name: str) -> None:
        super().__init__(handler, config, module_name)
        self.in_features, out = handler.in_features, handler.out_features
        b = config.block_size_for(module_name)
        if b <= 0:
            raise ValueError(f"`block_size` should be a positive integer value but the value passed is {b}")
        for what, size in (("input", self.in_features), ("output", out)):
            if size % b:
                raise ValueError(
                    f"{module_name}: the block size should be a factor of the {what} size. However, the {what} size "
                    f"is {size} and the block size is {b}; set block_size (or block_size_pattern) to a common factor"
                )
        init = _kernel_init(config.init_weights, self.in_features, out)
        self.specs = [ParamSpec("c3a_kernel", (out // b, self.in_features // b, b), ("c3a_kernel", ADAPTER), init)]

    def forward(
        self, x: torch.Tensor, result: torch.Tensor, p: dict[str, torch.Tensor], training: bool
    ) -> torch.Tensor:
        return result + (block_circular(x, p["c3a_kernel"]) / self.in_features).to(result.dtype)

    def delta_weight(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        kernel = p["c3a_kernel"]
        return (circulant_matrix(kernel.float()) / self.in_features).to(kernel.dtype)
