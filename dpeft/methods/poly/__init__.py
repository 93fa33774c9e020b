"""Poly: Polytropon's task-routed inventory of LoRA skills, and Multi-Head Routing (``n_splits`` > 1)."""

from dpeft.methods.poly.config import PolyConfig
from dpeft.methods.poly.layer import PolyLayer
from dpeft.methods.registry import register_method


def _make_layer(handler, config: PolyConfig, module_name: str) -> PolyLayer | None:
    return PolyLayer(handler, config, module_name) if handler.kind == "linear" else None


register_method(
    name="POLY",
    config_cls=PolyConfig,
    make_layer=_make_layer,
    prefix="poly_",
    forward_kwargs=PolyLayer.forward_kwargs,
)

__all__ = ["PolyConfig", "PolyLayer"]
