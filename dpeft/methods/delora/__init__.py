"""DeLoRA: decoupled low-rank adaptation with a bounded, normalised change (Bini et al., 2025)."""

from dpeft.methods.delora.config import DeloraConfig
from dpeft.methods.delora.layer import DeloraLayer
from dpeft.methods.registry import register_method


def _make_layer(handler, config: DeloraConfig, module_name: str) -> DeloraLayer | None:
    # PEFT's DeLoRA covers nn.Linear only (not transformers' Conv1D, embeddings or convolutions).
    if handler.kind != "linear" or handler.fan_in_fan_out:
        return None
    return DeloraLayer(handler, config, module_name)


register_method(name="DELORA", config_cls=DeloraConfig, make_layer=_make_layer, prefix="delora_")

__all__ = ["DeloraConfig", "DeloraLayer"]
