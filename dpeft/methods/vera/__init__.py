"""VeRA: vector-based random matrix adaptation (Kopiczko et al., 2024)."""

from dpeft.methods.registry import register_method
from dpeft.methods.shared_projection import SharedProjectionHooks
from dpeft.methods.vera.config import VeraConfig
from dpeft.methods.vera.layer import VeraLayer, shared_specs


class VeraHooks(SharedProjectionHooks):
    label = "VeRA"


def _make_layer(handler, config: VeraConfig, module_name: str) -> VeraLayer | None:
    return VeraLayer(handler, config, module_name) if handler.kind == "linear" else None


register_method(
    name="VERA",
    config_cls=VeraConfig,
    make_layer=_make_layer,
    prefix="vera_lambda_",
    shared_specs=shared_specs,
    model_hooks=VeraHooks,  # one projection_prng_key and one set of projections per model, as in PEFT
)

__all__ = ["VeraConfig", "VeraLayer"]
