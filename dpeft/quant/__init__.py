"""Base-layer handlers (plain layers now; bitsandbytes 4/8-bit layers register here), shared by all methods."""

from dpeft.quant.handlers import (
    BaseHandler,
    ConvHandler,
    EmbeddingHandler,
    LinearHandler,
    TransformersConv1DHandler,
    get_handler,
    register_handler,
    supported_layer_types,
)

__all__ = [
    "BaseHandler",
    "ConvHandler",
    "EmbeddingHandler",
    "LinearHandler",
    "TransformersConv1DHandler",
    "get_handler",
    "register_handler",
    "supported_layer_types",
]
