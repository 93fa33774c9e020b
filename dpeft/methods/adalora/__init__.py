"""AdaLoRA: SVD-form LoRA whose rank budget is reallocated during training (`update_and_allocate`)."""

from dpeft.methods.adalora.allocator import RankAllocator
from dpeft.methods.adalora.config import AdaLoraConfig
from dpeft.methods.adalora.hooks import AdaLoraHooks
from dpeft.methods.adalora.layer import AdaLoraLayer
from dpeft.methods.registry import register_method


def _make_layer(handler, config: AdaLoraConfig, module_name: str) -> AdaLoraLayer | None:
    if handler.kind not in ("linear", "conv2d"):
        return None  # PEFT's AdaLoRA has Linear / Conv1D / quantized linear and Conv2d forms only
    return AdaLoraLayer(handler, config, module_name)


register_method(
    name="ADALORA", config_cls=AdaLoraConfig, make_layer=_make_layer, prefix="lora_", model_hooks=AdaLoraHooks
)

__all__ = ["AdaLoraConfig", "AdaLoraHooks", "AdaLoraLayer", "RankAllocator"]
