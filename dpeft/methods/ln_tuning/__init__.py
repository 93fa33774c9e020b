"""LN tuning: train copies of the normalisation layers (Zhao et al., 2023, "Tuning LayerNorm in Attention")."""

from dpeft.methods.ln_tuning.config import LNTuningConfig
from dpeft.methods.ln_tuning.layer import LNTuningLayer, NormHandler, copyable
from dpeft.methods.registry import register_method
from dpeft.quant import register_handler

register_handler(NormHandler, first=True)  # norm layers, which no other handler takes


def _make_layer(handler, config: LNTuningConfig, module_name: str) -> LNTuningLayer | None:
    # As in HF PEFT, any layer can be tuned this way (norms are what the method is for): its parameters are copied.
    # A quantized layer's are not float values to train, and a layer with children is not one parameter set.
    return LNTuningLayer(handler, config, module_name) if copyable(handler.layer) else None


register_method(name="LN_TUNING", config_cls=LNTuningConfig, make_layer=_make_layer, prefix="ln_tuning_")

__all__ = ["LNTuningConfig", "LNTuningLayer"]
