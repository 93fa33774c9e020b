"""LoKr on nn.Linear, nn.Conv1d and nn.Conv2d base layers.

Math:  delta W = s * kron(W1, W2)  reshaped to the base weight, s = alpha / r. With out = a*b and in = c*d
(`factorization`), W1 is (a, c) and W2 is (b, d[, k..]); either factor is a rank-r product (W1 = w1_a @ w1_b
with `decompose_both`, W2 = w2_a @ w2_b) when r is below half its larger side, or a CP form with `t2` for
k>1 convs under `use_effective_conv2d`. Key names, shapes, the factor choice and init follow HF PEFT
(`lokr_w1`, `lokr_w1_a`, `lokr_w1_b`, `lokr_w2`, `lokr_w2_a`, `lokr_w2_b`, `lokr_t2`).
"""

from __future__ import annotations

import math

import torch

from dpeft.methods.loha.lycoris import LycorisLayer, kaiming, zeros
from dpeft.methods.lokr.config import LoKrConfig
from dpeft.quant import BaseHandler
from dpeft.store import ADAPTER, ParamSpec


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split `dimension` into (m, n), m <= n, m * n = dimension: m = `factor` when it divides, else the pair
    nearest the square root with m not above `factor` (HF PEFT's / LyCORIS's rule, so shapes match theirs)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate:
            candidate += 1
        if candidate + dimension // candidate > m + n or candidate > factor:
            break
        m, n = candidate, dimension // candidate
    return (n, m) if m > n else (m, n)


class LoKrLayer(LycorisLayer):
    def __init__(self, handler: BaseHandler, config: LoKrConfig, module_name: str) -> None:
        super().__init__(handler, config, module_name)
        self.rank_dropout_scale = config.rank_dropout_scale
        r = self.r
        a, b = factorization(handler.out_features, config.decompose_factor)
        c, d = factorization(self.in_dim, config.decompose_factor)
        kernel = tuple(self.weight_shape[2:])
        self.use_w1 = not (config.decompose_both and r < max(a, c) / 2)
        self.use_w2 = r >= max(b, d) / 2
        self.cp = self.effective_conv(config.use_effective_conv2d)
        init = config.init_weights

        # Which tensor starts at zero (making delta W = 0 at init) depends on the init mode, as in PEFT.
        def pick(name: str):
            if init is False:
                return kaiming
            if init == "lycoris":
                return zeros if name in ("lokr_w2", "lokr_w2_b") else kaiming
            return zeros if name in ("lokr_w1", "lokr_w1_a") else kaiming

        def spec(name: str, shape: tuple[int, ...]) -> ParamSpec:
            return ParamSpec(name, shape, (name, ADAPTER), pick(name))

        specs = [spec("lokr_w1", (a, c))] if self.use_w1 else [spec("lokr_w1_a", (a, r)), spec("lokr_w1_b", (r, c))]
        if self.use_w2:
            specs.append(spec("lokr_w2", (b, d, *kernel)))
        elif self.cp:
            t_kernel = kernel if len(kernel) == 2 else (kernel[0], 1)
            specs += [spec("lokr_t2", (r, r, *t_kernel)), spec("lokr_w2_a", (r, b)), spec("lokr_w2_b", (r, d))]
        else:
            cols = d * math.prod(kernel)  # a conv's (in/groups * kernel) flattened
            specs += [spec("lokr_w2_a", (b, r)), spec("lokr_w2_b", (r, cols))]
        # PEFT creates and initialises them in this order: w1 (or w1_a, w1_b), then w2 (or t2 / w2_a, w2_b).
        self.specs = _peft_init_order(specs)

    def make_delta(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        w1 = p["lokr_w1"] if self.use_w1 else p["lokr_w1_a"] @ p["lokr_w1_b"]
        if self.use_w2:
            w2 = p["lokr_w2"]
        elif self.cp:
            # t: (r, r, k, l); w2_a: (r, b); w2_b: (r, d)  ->  (b, d, k, l)
            w2 = torch.einsum("ijkl,ip,jr->prkl", p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
        else:
            w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        # torch.kron with the same operand shapes as PEFT, so the flattened element order is theirs.
        return torch.kron(w1, w2.contiguous()) * self.scaling


def _peft_init_order(specs: list[ParamSpec]) -> list[ParamSpec]:
    order = ["lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"]
    return sorted(specs, key=lambda s: order.index(s.name))
