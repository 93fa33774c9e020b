"""RandLoRA on linear base layers (nn.Linear, transformers' Conv1D, quantized linears).

Math, with m = min(in, out), M = max(in, out) and n = ceil(m / r) bases per layer:
  small = (lambda[:, :, None] * A[:, :, :m] * gamma[None]).flatten(0, 1)    (r * n, m)
  large = B[:M, :n, :].flatten(1)                                            (M, n * r)
  delta y = alpha / r * large-side(small-side(x))   (the m side faces the smaller of in / out)
A (r, 1, max m) and B (max M, max n, r) are frozen random bases shared by all layers (model-level store entries,
saved as ``base_model.randlora_A`` / ``_B`` and, as PEFT writes them, once more under every layer); lambda (r, n)
and gamma (n, m) train per layer. Init follows HF PEFT: bases from one generator seeded with
`projection_prng_key` (kaiming-uniform in bfloat16, or ternary with `sparse` / `very_sparse`), each divided by its
standard deviation; lambda zeros and gamma 1 / max(n, m) (the identity), or normal / (1 / M) with
`init_weights=False`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dpeft.methods.base import MethodLayer
from dpeft.methods.randlora.config import RandLoraConfig
from dpeft.quant import BaseHandler
from dpeft.store import ADAPTER, ParamSpec


def _num_bases(min_dim: int, r: int) -> int:
    return math.ceil(min_dim / r)


def _dense_bases(r: int, min_dim: int, max_dim: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    # PEFT draws in bfloat16 (float16 where bf16 is unavailable; bf16 everywhere here, so the bases do not depend on
    # the device) and normalises in that dtype.
    def draw(shape: tuple[int, ...]) -> torch.Tensor:
        t = torch.empty(shape, dtype=torch.bfloat16)
        return torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)

    a = draw((r, 1, min_dim))
    b = torch.cat([draw((max_dim, 1, r)) for _ in range(_num_bases(min_dim, r))], dim=1)
    return a / a.std(), b / b.std()


def _sparse_bases(
    r: int, min_dim: int, max_dim: int, generator: torch.Generator, sparsity: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary bases (Achlioptas / Li et al. very sparse random projections): -1, 0, 1 with 1/sparsity non-zero."""
    a = torch.rand((r, 1, min_dim), generator=generator)
    b = torch.rand((max_dim, _num_bases(min_dim, r), r), generator=generator)
    out = []
    for u in (a, b):
        t = torch.zeros(u.shape)
        t[u < 1 / (2 * sparsity)] = -1
        t[u > 1 - 1 / (2 * sparsity)] = 1
        out.append(t / t.std())
    return out[0], out[1]


def make_bases(config: RandLoraConfig, out_dim: int, in_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared bases (A, B) for the largest targeted (out, in), as PEFT draws them."""
    max_dim, min_dim = max(out_dim, in_dim), min(out_dim, in_dim)
    generator = torch.Generator().manual_seed(config.projection_prng_key)
    if config.very_sparse:
        return _sparse_bases(config.r, min_dim, max_dim, generator, math.sqrt(min_dim))
    if config.sparse:
        return _sparse_bases(config.r, min_dim, max_dim, generator, 3)
    return _dense_bases(config.r, min_dim, max_dim, generator)


def shared_specs(config: RandLoraConfig, handlers: dict[str, BaseHandler]) -> list[ParamSpec]:
    """The adapter's shared bases, sized by the largest targeted linear layer."""
    sizes = [(h.out_features, h.in_features) for h in handlers.values() if h.kind == "linear"]
    if not sizes:
        return []  # no linear target: the injector reports the layer types
    out_dim, in_dim = max(o for o, _ in sizes), max(i for _, i in sizes)
    max_dim, min_dim = max(out_dim, in_dim), min(out_dim, in_dim)
    n = _num_bases(min_dim, config.r)

    def init(which: int):
        def fill(t: torch.Tensor) -> None:  # re-runnable: each call regenerates both from the seed
            t.copy_(make_bases(config, out_dim, in_dim)[which])

        return fill

    kw = dict(trainable=False, buffer=True, persistent=config.save_projection, layer_copies=True)
    return [
        ParamSpec("randlora_A", (config.r, 1, min_dim), ("randlora_A", ADAPTER), init(0), **kw),
        ParamSpec("randlora_B", (max_dim, n, config.r), ("randlora_B", ADAPTER), init(1), **kw),
    ]


class RandLoraLayer(MethodLayer):
    """Per-layer RandLoRA scalings; the shared bases arrive in `p` as ``randlora_A`` / ``randlora_B``."""

    def __init__(self, handler: BaseHandler, config: RandLoraConfig, module_name: str) -> None:
        super().__init__(handler, config, module_name)
        self.out_features, self.in_features = handler.out_features, handler.in_features
        self.min_dim, self.max_dim = min(self.in_features, self.out_features), max(self.in_features, self.out_features)
        self.num_bases = _num_bases(self.min_dim, config.r)
        self.scaling = config.randlora_alpha / config.r
        self.dropout = config.randlora_dropout
        zero, max_dim = config.init_weights, self.max_dim

        def init_lambda(t: torch.Tensor) -> None:
            # Drawn even when zeroed next, as PEFT does, so the same seed gives PEFT's tensors in every layer.
            t.copy_(torch.randn(t.shape, dtype=t.dtype, device=t.device))
            if zero:
                t.zero_()

        def init_gamma(t: torch.Tensor) -> None:
            t.fill_(1 / max(t.shape) if zero else 1 / max_dim)

        self.specs = [
            ParamSpec("randlora_lambda", (config.r, self.num_bases), ("randlora_lambda", ADAPTER), init_lambda),
            ParamSpec("randlora_gamma", (self.num_bases, self.min_dim), ("randlora_gamma", ADAPTER), init_gamma),
        ]

    def factors(self, p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(first, second): delta y = second @ (first @ x), i.e. delta W = second @ first (unscaled)."""
        lam, gamma = p["randlora_lambda"], p["randlora_gamma"]
        a = p["randlora_A"][:, : self.num_bases, : self.min_dim].to(lam.dtype)
        small = (lam[:, :, None] * a * gamma[None]).flatten(end_dim=1)  # (r * n, m)
        large = p["randlora_B"][: self.max_dim, : self.num_bases, :].to(lam.dtype).flatten(start_dim=1)  # (M, n * r)
        if self.min_dim == self.in_features:
            return small, large
        return large.T, small.T

    def forward(
        self, x: torch.Tensor, result: torch.Tensor, p: dict[str, torch.Tensor], training: bool
    ) -> torch.Tensor:
        first, second = self.factors(p)
        if self.dropout and training:
            x = F.dropout(x, self.dropout, training=True)
        return result + F.linear(F.linear(x, first), second) * self.scaling

    def delta_weight(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = p["randlora_lambda"].dtype
        if dtype in (torch.float16, torch.bfloat16):  # half-precision matmuls are slow on CPUs, as PEFT notes
            p = {k: v.float() for k, v in p.items()}
        first, second = self.factors(p)
        return ((second @ first) * self.scaling).to(dtype)
