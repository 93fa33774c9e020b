"""HRA: Householder reflection adaptation (Yuan et al., 2024)."""

from dpeft.methods.hra.config import HRAConfig
from dpeft.methods.hra.layer import HRALayer
from dpeft.methods.registry import register_method


def _make_layer(handler, config: HRAConfig, module_name: str) -> HRALayer | None:
    # PEFT's HRA covers nn.Linear and nn.Conv2d, not transformers' Conv1D or embeddings.
    if handler.kind not in ("linear", "conv2d") or handler.fan_in_fan_out:
        return None
    return HRALayer(handler, config, module_name)


register_method(name="HRA", config_cls=HRAConfig, make_layer=_make_layer, prefix="hra_")

__all__ = ["HRAConfig", "HRALayer"]
