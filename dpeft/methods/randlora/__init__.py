"""RandLoRA: full-rank updates from shared random bases with trainable diagonal scalings (Albert et al., 2025)."""

from dpeft.methods.randlora.config import RandLoraConfig
from dpeft.methods.randlora.layer import RandLoraLayer, shared_specs
from dpeft.methods.registry import register_method
from dpeft.methods.shared_projection import SharedProjectionHooks


class RandLoraHooks(SharedProjectionHooks):
    label = "RandLora"


def _make_layer(handler, config: RandLoraConfig, module_name: str) -> RandLoraLayer | None:
    return RandLoraLayer(handler, config, module_name) if handler.kind == "linear" else None


register_method(
    name="RANDLORA",
    config_cls=RandLoraConfig,
    make_layer=_make_layer,
    prefix="randlora_",
    shared_specs=shared_specs,
    model_hooks=RandLoraHooks,  # one projection_prng_key and one set of projections per model, as in PEFT
)

__all__ = ["RandLoraConfig", "RandLoraLayer"]
