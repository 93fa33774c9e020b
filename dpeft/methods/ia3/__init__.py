"""(IA)^3: learned vectors that rescale activations (outputs, or inputs of feedforward layers)."""

from dpeft.methods.ia3.config import IA3Config
from dpeft.methods.ia3.layer import IA3Layer
from dpeft.methods.registry import register_method


def _make_layer(handler, config: IA3Config, module_name: str) -> IA3Layer | None:
    if handler.kind not in ("linear", "conv2d", "conv3d"):
        return None  # PEFT's (IA)^3 has no embedding or Conv1d form
    return IA3Layer(handler, config, module_name)


register_method(name="IA3", config_cls=IA3Config, make_layer=_make_layer, prefix="ia3_")

__all__ = ["IA3Config", "IA3Layer"]
