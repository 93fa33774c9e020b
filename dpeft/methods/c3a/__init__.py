"""C3A: parameter-efficient fine-tuning with block circular convolution (Chen et al., 2025)."""

from dpeft.methods.c3a.config import C3AConfig
from dpeft.methods.c3a.layer import C3ALayer
from dpeft.methods.registry import register_method


def _make_layer(handler, config: C3AConfig, module_name: str) -> C3ALayer | None:
    return C3ALayer(handler, config, module_name) if handler.kind == "linear" else None


register_method(name="C3A", config_cls=C3AConfig, make_layer=_make_layer, prefix="c3a_")

__all__ = ["C3AConfig", "C3ALayer"]
