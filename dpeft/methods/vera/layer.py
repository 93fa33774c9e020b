"""VeRA on linear base layers (nn.Linear, transformers' Conv1D, quantized linears).

Math, for a layer with `in` inputs and `out` outputs:  delta y = lambda_b * (B[:out] (lambda_d * (A[:, :in] x)))
where A (r, max in) and B (max out, r) are frozen random projections shared by every layer of the adapter
(model-level store entries, saved once as ``base_model.vera_A`` / ``base_model.vera_B`` when `save_projection`),
sized by the largest targeted layer and sliced per layer; lambda_d (r,) and lambda_b (out,) train per layer.
Init follows HF PEFT: A then B kaiming-uniform from one generator seeded with `projection_prng_key`; lambda_b
zeros and lambda_d = d_initial (the identity), or ones and normal with `init_weights=False`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dpeft.methods.base import MethodLayer
from dpeft.methods.vera.config import VeraConfig
from dpeft.quant import BaseHandler
from dpeft.store import ADAPTER, ParamSpec


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform values (fan_in, gain sqrt(2)), drawn on the CPU so a seeded projection is the same anywhere."""
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def projection_init(seed: int, shapes: list[tuple[int, int]]):
    """An init giving the last of `shapes` as PEFT draws it: one generator seeded with `seed` draws each shape in
    turn. Each call re-seeds, so the init can run again (the merge tool regenerates unsaved projections)."""

    def init(t: torch.Tensor) -> None:
        generator = torch.Generator().manual_seed(seed)
        for shape in shapes:
            values = _kaiming_uniform(shape, generator)
        t.copy_(values)

    return init


def largest_shape(handlers: dict[str, BaseHandler]) -> tuple[int, int]:
    """(out, in): the largest output and input sizes over the linear layers among `handlers`."""
    sizes = [(h.out_features, h.in_features) for h in handlers.values() if h.kind == "linear"]
    if not sizes:
        return 0, 0
    return max(o for o, _ in sizes), max(i for _, i in sizes)


def shared_specs(config: VeraConfig, handlers: dict[str, BaseHandler]) -> list[ParamSpec]:
    """The adapter's shared projections, sized by the largest targeted linear layer."""
    out_dim, in_dim = largest_shape(handlers)
    if not out_dim:
        return []  # no linear target: the injector reports the layer types
    a_shape, b_shape = (config.r, in_dim), (out_dim, config.r)
    kw = dict(trainable=False, buffer=True, persistent=config.save_projection)
    seed = config.projection_prng_key  # one generator draws A, then B
    return [
        ParamSpec("vera_A", a_shape, ("vera_A", ADAPTER), projection_init(seed, [a_shape]), **kw),
        ParamSpec("vera_B", b_shape, ("vera_B", ADAPTER), projection_init(seed, [a_shape, b_shape]), **kw),
    ]


class VeraLayer(MethodLayer):
    """Per-layer VeRA scalings; the shared projections arrive in `p` as ``vera_A`` / ``vera_B``."""

    def __init__(self, handler: BaseHandler, config: VeraConfig, module_name: str) -> None:
        super().__init__(handler, config, module_name)
        self.out_features, self.in_features = handler.out_features, handler.in_features
        self.dropout = config.vera_dropout
        r, zero = config.r, config.init_weights

        def init_b(t: torch.Tensor) -> None:
            t.fill_(0.0 if zero else 1.0)

        def init_d(t: torch.Tensor) -> None:
            # Drawn even when overwritten next, as PEFT does, so the same seed gives PEFT's tensors in every layer.
            t.copy_(torch.randn(t.shape, dtype=t.dtype, device=t.device))
            if zero:
                t.fill_(config.d_initial)

        self.specs = [
            ParamSpec("vera_lambda_b", (self.out_features,), ("vera_lambda_b", ADAPTER), init_b),
            ParamSpec("vera_lambda_d", (r,), ("vera_lambda_d", ADAPTER), init_d),
        ]

    def _projections(self, p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return p["vera_A"][:, : self.in_features], p["vera_B"][: self.out_features]

    def forward(
        self, x: torch.Tensor, result: torch.Tensor, p: dict[str, torch.Tensor], training: bool
    ) -> torch.Tensor:
        a, b = self._projections(p)
        if self.dropout and training:
            x = F.dropout(x, self.dropout, training=True)
        hidden = F.linear(x, a.to(x.dtype)) * p["vera_lambda_d"]
        return result + p["vera_lambda_b"] * F.linear(hidden, b.to(x.dtype))

    def delta_weight(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        a, b = self._projections(p)
        dtype = p["vera_lambda_b"].dtype
        # Half-precision matmuls are slow on CPUs: compute in float32 there, as PEFT does.
        compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        scaled_b = p["vera_lambda_b"].to(compute)[:, None] * b.to(compute)
        scaled_a = p["vera_lambda_d"].to(compute)[:, None] * a.to(compute)
        return (scaled_b @ scaled_a).to(dtype)
