"""SHiRA: sparse high-rank adapters (Bhardwaj et al., 2024)."""

from dpeft.methods.registry import register_method
from dpeft.methods.shira.config import ShiraConfig
from dpeft.methods.shira.layer import ShiraLayer


def _make_layer(handler, config: ShiraConfig, module_name: str) -> ShiraLayer | None:
    return ShiraLayer(handler, config, module_name) if handler.kind == "linear" else None


register_method(name="SHIRA", config_cls=ShiraConfig, make_layer=_make_layer, prefix="shira_")

__all__ = ["ShiraConfig", "ShiraLayer"]
