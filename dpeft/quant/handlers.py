"""Base-layer handlers: one per kind of layer an adapter can sit on, shared by every method.

A handler answers what a method needs to know about its base layer without the method looking at the layer's
class: sizes, the layer's own forward, its weight as a float (out_features, in_features, ...) tensor for merging
and weight norms, and writing a merged weight back. The dispatcher picks the first handler that accepts a layer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class BaseHandler:
    """A base layer as methods see it.

    Attributes:
        kind: ``"linear"``, ``"embedding"``, ``"conv1d"`` or ``"conv2d"``: which form of a method's math applies.
        in_features / out_features: Input and output sizes (for embeddings: num_embeddings / embedding_dim).
        fan_in_fan_out: True when the stored weight is (in, out), as in transformers' `Conv1D`.
    """

    kind: str = "linear"
    fan_in_fan_out: bool = False

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    @classmethod
    def accepts(cls, layer: nn.Module) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def weight_param(self) -> torch.Tensor:
        return self.layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.layer, "bias", None)

    @property
    def device(self) -> torch.device:
        return self.weight_param.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weight_param.dtype

    def weight(self) -> torch.Tensor:
        """The weight in (out, in, ...) orientation, dequantized, without a copy where none is needed."""
        return self.weight_param

    def stored_layout(self, weight: torch.Tensor) -> torch.Tensor:
        """Turn an (out, in, ...) tensor into the layout the layer stores (inverse of `weight()`'s transpose)."""
        return weight

    def logical_layout(self, stored: torch.Tensor) -> torch.Tensor:
        """Turn a tensor in the layer's stored layout into (out, in, ...) (inverse of `stored_layout`)."""
        return stored

    def is_plain(self) -> bool:
        """Whether the layer is exactly a torch layer class (not a subclass) holding plain parameters (not DTensors,
        quantized or engine-managed ones), so a method may compute with its weight directly in a fused path."""
        layer = self.layer
        return type(layer) in _PLAIN_LAYERS and all(
            type(t) is nn.Parameter for t in layer._parameters.values() if t is not None
        )

    def set_weight(self, weight: torch.Tensor) -> None:
        """Write an (out, in, ...) float weight back into the layer, in its own dtype and layout."""
        w = self.stored_layout(weight).to(self.weight_param.dtype)
        self.weight_param.data.copy_(w)


class LinearHandler(BaseHandler):
    kind = "linear"

    @classmethod
    def accepts(cls, layer: nn.Module) -> bool:
        return isinstance(layer, nn.Linear)

    @property
    def in_features(self) -> int:
        return self.layer.in_features

    @property
    def out_features(self) -> int:
        return self.layer.out_features


class TransformersConv1DHandler(BaseHandler):
    """transformers' GPT-2 style `Conv1D`: a linear layer whose weight is stored (in, out)."""

    kind = "linear"
    fan_in_fan_out = True

    @classmethod
    def accepts(cls, layer: nn.Module) -> bool:
        return type(layer).__name__ == "Conv1D" and type(layer).__module__.startswith("transformers")

    @property
    def in_features(self) -> int:
        return self.layer.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.layer.weight.shape[1]

    def weight(self) -> torch.Tensor:
        return self.weight_param.T

    def stored_layout(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T

    def logical_layout(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.T


class EmbeddingHandler(BaseHandler):
    kind = "embedding"

    @classmethod
    def accepts(cls, layer: nn.Module) -> bool:
        return isinstance(layer, nn.Embedding)

    @property
    def in_features(self) -> int:
        return self.layer.num_embeddings

    @property
    def out_features(self) -> int:
        return self.layer.embedding_dim

    def embed(self, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Look `ids` up in `weight` with the base layer's padding and norm settings."""
        layer = self.layer
        return F.embedding(
            ids, weight, layer.padding_idx, layer.max_norm, layer.norm_type, layer.scale_grad_by_freq, layer.sparse
        )

    def embed_scale(self) -> torch.Tensor | None:
        """Scaled embeddings (e.g. Gemma's) multiply their output; adapter outputs are scaled alike."""
        scale = getattr(self.layer, "embed_scale", None)
        return scale if isinstance(scale, torch.Tensor) else None


class ConvHandler(BaseHandler):
    @classmethod
    def accepts(cls, layer: nn.Module) -> bool:
        return isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d))

    @property
    def kind(self) -> str:  # type: ignore[override]
        return f"conv{self.layer.weight.dim() - 2}d"

    @property
    def in_features(self) -> int:
        return self.layer.in_channels

    @property
    def out_features(self) -> int:
        return self.layer.out_channels

    @property
    def conv_fn(self) -> Callable[..., torch.Tensor]:
        return {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[self.layer.weight.dim()]

    def conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's convolution with another weight and no bias."""
        layer = self.layer
        return self.conv_fn(x, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)


_PLAIN_LAYERS = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)

_HANDLERS: list[type[BaseHandler]] = [LinearHandler, TransformersConv1DHandler, EmbeddingHandler, ConvHandler]


def register_handler(handler: type[BaseHandler], *, first: bool = True) -> None:
    """Add a handler for another kind of base layer (quantized layers register themselves first)."""
    if handler in _HANDLERS:
        return
    _HANDLERS.insert(0, handler) if first else _HANDLERS.append(handler)


def supported_layer_types() -> list[str]:
    return ["nn.Linear", "transformers Conv1D", "nn.Embedding", "nn.Conv1d", "nn.Conv2d", "nn.Conv3d"] + [
        h.__name__.removesuffix("Handler") for h in _HANDLERS[: len(_HANDLERS) - 4]
    ]


def get_handler(layer: nn.Module) -> BaseHandler | None:
    """The first handler that accepts `layer`, or None if no method can sit on it."""
    for handler in _HANDLERS:
        if handler.accepts(layer):
            return handler(layer)
    return None
