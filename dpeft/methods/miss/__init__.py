"""MiSS (formerly Bone): a shared block added to every slice of the weight, and its "bat" and "mini" variants."""

from dpeft.methods.miss.config import MissConfig
from dpeft.methods.miss.layer import MissLayer
from dpeft.methods.registry import register_method


def _make_layer(handler, config: MissConfig, module_name: str) -> MissLayer | None:
    if handler.kind != "linear" or handler.fan_in_fan_out:
        return None  # PEFT's MiSS has nn.Linear (and quantized linear) forms only, not transformers Conv1D
    return MissLayer(handler, config, module_name)


register_method(name="MISS", config_cls=MissConfig, make_layer=_make_layer, prefix="miss_")

__all__ = ["MissConfig", "MissLayer"]
