"""Prefix tuning (Li & Liang): trainable key/value prefixes in every attention layer, given as a cache."""

from dpeft.methods.prefix_tuning.config import PrefixTuningConfig
from dpeft.methods.prefix_tuning.encoder import PrefixEncoder
from dpeft.methods.registry import register_method

register_method(
    name="PREFIX_TUNING",
    config_cls=PrefixTuningConfig,
    make_layer=None,
    prefix="prefix_tuning_",
    make_encoder=PrefixEncoder,
)

__all__ = ["PrefixEncoder", "PrefixTuningConfig"]
