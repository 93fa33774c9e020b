"""LoHa: low-rank Hadamard-product adaptation (LyCORIS)."""

from dpeft.methods.loha.config import LoHaConfig
from dpeft.methods.loha.layer import LoHaLayer
from dpeft.methods.loha.lycoris import lycoris_supports
from dpeft.methods.registry import register_method


def _make_layer(handler, config: LoHaConfig, module_name: str) -> LoHaLayer | None:
    return LoHaLayer(handler, config, module_name) if lycoris_supports(handler) else None


register_method(name="LOHA", config_cls=LoHaConfig, make_layer=_make_layer, prefix="hada_")

__all__ = ["LoHaConfig", "LoHaLayer"]
