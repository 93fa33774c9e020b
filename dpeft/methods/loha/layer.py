"""LoHa on nn.Linear, nn.Conv1d and nn.Conv2d base layers.

Math:  delta W = s * (W1a @ W1b) * (W2a @ W2b)  (elementwise product), s = alpha / r, reshaped to the base
weight; with `use_effective_conv2d` on a k>1 conv each factor is a CP form  einsum(t, w_b, w_a) -> (out, in, k..).
Key names and init follow HF PEFT: `hada_w1_a` (out, r), `hada_w1_b` (r, in), same for w2, `hada_t1`/`hada_t2`
(r, r, k, k or 1); init: kaiming for all but `hada_w2_b` = 0 (delta starts at 0), or all kaiming when
`init_weights=False`.
"""

from __future__ import annotations

import math

import torch

from dpeft.methods.loha.config import LoHaConfig
from dpeft.methods.loha.lycoris import LycorisLayer, kaiming
from dpeft.quant import BaseHandler
from dpeft.store import ADAPTER, ParamSpec


def _spec(name: str, shape: tuple[int, ...], init) -> ParamSpec:
    return ParamSpec(name, shape, (name, ADAPTER), init)


class LoHaLayer(LycorisLayer):
    def __init__(self, handler: BaseHandler, config: LoHaConfig, module_name: str) -> None:
        super().__init__(handler, config, module_name)
        r, out = self.r, handler.out_features
        w2b_init = None if config.init_weights else kaiming
        self.cp = self.effective_conv(config.use_effective_conv2d)
        if self.cp:
            ks = tuple(handler.layer.kernel_size)
            ks = ks if len(ks) == 2 else (ks[0], 1)
            # In PEFT's init order (the same seed gives the same tensors): the w factors, then the cores.
            self.specs = [
                _spec("hada_w1_a", (r, out), kaiming),
                _spec("hada_w1_b", (r, self.in_dim), kaiming),
                _spec("hada_w2_a", (r, out), kaiming),
                _spec("hada_w2_b", (r, self.in_dim), w2b_init),
                _spec("hada_t1", (r, r, *ks), kaiming),
                _spec("hada_t2", (r, r, *ks), kaiming),
            ]
        else:
            cols = math.prod(self.weight_shape[1:])  # a conv's (in/groups * kernel) flattened
            self.specs = [
                _spec("hada_w1_a", (out, r), kaiming),
                _spec("hada_w1_b", (r, cols), kaiming),
                _spec("hada_w2_a", (out, r), kaiming),
                _spec("hada_w2_b", (r, cols), w2b_init),
            ]

    def make_delta(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.cp:
            # t: (r, r, k, l); w_a: (r, out); w_b: (r, in)  ->  (out, in, k, l)
            w1 = torch.einsum("ijkl,jr,ip->prkl", p["hada_t1"], p["hada_w1_b"], p["hada_w1_a"])
            w2 = torch.einsum("ijkl,jr,ip->prkl", p["hada_t2"], p["hada_w2_b"], p["hada_w2_a"])
        else:
            w1 = p["hada_w1_a"] @ p["hada_w1_b"]
            w2 = p["hada_w2_a"] @ p["hada_w2_b"]
        return w1 * w2 * self.scaling
