"""Base-layer handlers (plain layers and bitsandbytes 4/8-bit layers), shared by all methods; first match wins."""

from dpeft.quant.bnb import (
    Linear4bitHandler,
    Linear8bitLtHandler,
    is_bnb_layer,
    quantize_linear_layers,
    quantized_handler,
)
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

# Quantized layers go first: bnb's layers subclass nn.Linear, which the plain linear handler would otherwise take.
register_handler(Linear8bitLtHandler, first=True)
register_handler(Linear4bitHandler, first=True)

__all__ = [
    "BaseHandler",
    "ConvHandler",
    "EmbeddingHandler",
    "Linear4bitHandler",
    "Linear8bitLtHandler",
    "LinearHandler",
    "TransformersConv1DHandler",
    "get_handler",
    "is_bnb_layer",
    "quantize_linear_layers",
    "quantized_handler",
    "register_handler",
    "supported_layer_types",
]
