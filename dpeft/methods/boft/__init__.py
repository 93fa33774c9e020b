"""BOFT: orthogonal fine-tuning with butterfly factorization (Liu et al., 2024)."""

from dpeft.methods.boft.config import BOFTConfig
from dpeft.methods.boft.layer import BOFTLayer
from dpeft.methods.registry import register_method


def _make_layer(handler, config: BOFTConfig, module_name: str) -> BOFTLayer | None:
    # PEFT's BOFT covers nn.Linear (and quantized linears) and nn.Conv2d, not transformers' Conv1D or embeddings.
    if handler.kind not in ("linear", "conv2d") or handler.fan_in_fan_out:
        return None
    return BOFTLayer(handler, config, module_name)


register_method(name="BOFT", config_cls=BOFTConfig, make_layer=_make_layer, prefix="boft_")

__all__ = ["BOFTConfig", "BOFTLayer"]
