"""FourierFT: fine-tuning with a sparse spectrum of the delta weight (Gao et al., 2024)."""

from dpeft.methods.fourierft.config import FourierFTConfig
from dpeft.methods.fourierft.layer import FourierFTLayer
from dpeft.methods.registry import register_method


def _make_layer(handler, config: FourierFTConfig, module_name: str) -> FourierFTLayer | None:
    return FourierFTLayer(handler, config, module_name) if handler.kind == "linear" else None


register_method(name="FOURIERFT", config_cls=FourierFTConfig, make_layer=_make_layer, prefix="fourierft_")

__all__ = ["FourierFTConfig", "FourierFTLayer"]
