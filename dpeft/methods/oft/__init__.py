"""OFT: orthogonal fine-tuning with block-diagonal Cayley rotations (Qiu et al., 2023)."""

from dpeft.methods.oft.config import OFTConfig
from dpeft.methods.oft.layer import OFTLayer
from dpeft.methods.registry import register_method


def _make_layer(handler, config: OFTConfig, module_name: str) -> OFTLayer | None:
    # PEFT's OFT covers nn.Linear (and quantized linears), nn.Conv2d and nn.Embedding, not transformers' Conv1D.
    if handler.kind not in ("linear", "conv2d", "embedding") or handler.fan_in_fan_out:
        return None
    return OFTLayer(handler, config, module_name)


register_method(name="OFT", config_cls=OFTConfig, make_layer=_make_layer, prefix="oft_")

__all__ = ["OFTConfig", "OFTLayer"]
