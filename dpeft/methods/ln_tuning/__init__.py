"""LN tuning: train copies of the normalisation layers (Zhao et al., 2023, "Tuning LayerNorm in Attention")."""

from dpeft.methods.ln_tuning.config import LNTuningConfig
from dpeft.methods.ln_tuning.layer import LNTuningLayer, NormHandler
from dpeft.methods.registry import register_method
from dpeft.quant import register_handler

register_handler(NormHandler, first=True)  # accepts only norm layers, which no other handler takes


def _make_layer(handler, config: LNTuningConfig, module_name: str) -> LNTuningLayer | None:
    return LNTuningLayer(handler, config, module_name) if handler.kind == "norm" else None


register_method(name="LN_TUNING", config_cls=LNTuningConfig, make_layer=_make_layer, prefix="ln_tuning_")

__all__ = ["LNTuningConfig", "LNTuningLayer"]
