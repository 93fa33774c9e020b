"""VB-LoRA: LoRA factors composed from a shared vector bank (Li et al., 2024)."""

from dpeft.methods.registry import register_method
from dpeft.methods.vblora.config import VBLoRAConfig
from dpeft.methods.vblora.layer import VBLoRALayer, shared_specs
from dpeft.methods.vblora.topk import VBLoRAHooks


def _make_layer(handler, config: VBLoRAConfig, module_name: str) -> VBLoRALayer | None:
    # PEFT covers nn.Linear and transformers' Conv1D; the shared handlers give quantized linears here too.
    return VBLoRALayer(handler, config, module_name) if handler.kind == "linear" else None


register_method(
    name="VBLORA",
    config_cls=VBLoRAConfig,
    make_layer=_make_layer,
    prefix="vblora_",
    shared_specs=shared_specs,
    model_hooks=VBLoRAHooks,  # save_only_topk_weights
)

__all__ = ["VBLoRAConfig", "VBLoRALayer"]
