"""What the orthogonal methods (OFT, BOFT, HRA) share: a merged weight W' = f(W) that is linear in W, applied to
convolutions (and wherever the input cannot simply be transformed) through the weight rather than the activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpeft.methods.base import MethodLayer


class WeightFormLayer(MethodLayer):
    """A method whose merged weight `merged(W, p, training)` is a linear function of W.

    Its change of the output is then the base layer's own linear map / convolution with ``merged(W) - W``, which
    the general path (several adapters, mixed batches, hooked bases) adds to the base output; the fused path runs
    one convolution with ``merged(W)`` instead of two.
    """

    def merged(self, weight: torch.Tensor, p: dict[str, torch.Tensor], training: bool = False) -> torch.Tensor:
        """The merged weight, same shape and dtype as `weight`."""
        raise NotImplementedError

    def adapter_dtype(self, p: dict[str, torch.Tensor]) -> torch.dtype:
        return next(iter(p.values())).dtype

    def weight_delta_output(
        self, x: torch.Tensor, result: torch.Tensor, p: dict[str, torch.Tensor], training: bool
    ) -> torch.Tensor:
        """result + (the base layer's map of x with merged(W) - W, no bias)."""
        weight = self.handler.weight().to(self.adapter_dtype(p))
        return self._base_map(x, result, self.merged(weight, p, training) - weight)

    def _base_map(self, x: torch.Tensor, result: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """result + the base layer's linear map / convolution of x with the weight `delta` (no bias)."""
        if self.handler.kind == "linear":
            return result + F.linear(x, delta)
        return result + self.handler.layer._conv_forward(x, delta, None)

    def chained_forward(
        self,
        x: torch.Tensor,
        result: torch.Tensor,
        chain: list[tuple[MethodLayer, dict[str, torch.Tensor]]],
        training: bool,
    ) -> torch.Tensor:
        """result + (the base map of x with W_n - W), W_n the weight merged with each adapter of `chain` in turn."""
        weight = self.handler.weight().to(self.adapter_dtype(chain[0][1]))
        merged = weight
        for method, p in chain:
            merged = method.merged(merged, p, training)
        return self._base_map(x, result, merged - weight)

    def conv_fused(self, x: torch.Tensor, p: dict[str, torch.Tensor], training: bool) -> torch.Tensor | None:
        """One convolution with merged(W) and the base bias, on a plain conv base of the adapter's dtype."""
        layer = self.handler.layer
        if self.handler.kind != "conv2d" or not self.handler.is_plain():
            return None
        if not (x.dtype == layer.weight.dtype == self.adapter_dtype(p)):
            return None
        return layer._conv_forward(x, self.merged(layer.weight, p, training), layer.bias)

    def merge_weight(self, weight: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.merged(weight, p)

    def delta_weight(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        weight = self.handler.weight().detach()
        return self.merged(weight, p) - weight
