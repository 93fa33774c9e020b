"""LoRA, rsLoRA and DoRA."""

from dpeft.methods.lora.config import LoraConfig
from dpeft.methods.lora.dora import DoraLayer
from dpeft.methods.lora.layer import LoraLayer
from dpeft.methods.registry import register_method


def _make_layer(handler, config: LoraConfig, module_name: str) -> LoraLayer | None:
    if handler.kind not in ("linear", "embedding", "conv1d", "conv2d", "conv3d"):
        return None
    return (DoraLayer if config.use_dora else LoraLayer)(handler, config, module_name)


register_method(name="LORA", config_cls=LoraConfig, make_layer=_make_layer, prefix="lora_")

__all__ = ["DoraLayer", "LoraConfig", "LoraLayer"]
