"""Prompt tuning (Lester et al.): trainable virtual-token embeddings prepended to the input."""

from dpeft.methods.prompt_tuning.config import PromptTuningConfig, PromptTuningInit
from dpeft.methods.prompt_tuning.encoder import PromptEmbedding
from dpeft.methods.registry import register_method

register_method(
    name="PROMPT_TUNING",
    config_cls=PromptTuningConfig,
    make_layer=None,
    prefix="prompt_tuning_",
    make_encoder=PromptEmbedding,
)

__all__ = ["PromptEmbedding", "PromptTuningConfig", "PromptTuningInit"]
