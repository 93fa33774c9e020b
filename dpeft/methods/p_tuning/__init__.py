"""P-tuning (Liu et al.): virtual-token embeddings reparameterised by an MLP or LSTM encoder."""

from dpeft.methods.p_tuning.config import PromptEncoderConfig, PromptEncoderReparameterizationType
from dpeft.methods.p_tuning.encoder import PTuningEncoder
from dpeft.methods.registry import register_method

register_method(
    name="P_TUNING", config_cls=PromptEncoderConfig, make_layer=None, prefix="p_tuning_", make_encoder=PTuningEncoder
)

__all__ = ["PTuningEncoder", "PromptEncoderConfig", "PromptEncoderReparameterizationType"]
