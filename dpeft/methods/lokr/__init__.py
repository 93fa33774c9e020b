"""LoKr: low-rank Kronecker-product adaptation (LyCORIS)."""

from dpeft.methods.loha.lycoris import lycoris_supports
from dpeft.methods.lokr.config import LoKrConfig
from dpeft.methods.lokr.layer import LoKrLayer, factorization
from dpeft.methods.registry import register_method


def _make_layer(handler, config: LoKrConfig, module_name: str) -> LoKrLayer | None:
    return LoKrLayer(handler, config, module_name) if lycoris_supports(handler) else None


register_method(name="LOKR", config_cls=LoKrConfig, make_layer=_make_layer, prefix="lokr_")

__all__ = ["LoKrConfig", "LoKrLayer", "factorization"]
