"""Multitask prompt tuning (Wang et al.): a shared prompt with low-rank task-specific scaling."""

from dpeft.methods.multitask_prompt_tuning.config import MultitaskPromptTuningConfig, MultitaskPromptTuningInit
from dpeft.methods.multitask_prompt_tuning.encoder import MultitaskPromptEmbedding
from dpeft.methods.registry import register_method

register_method(
    name="MULTITASK_PROMPT_TUNING",
    config_cls=MultitaskPromptTuningConfig,
    make_layer=None,
    prefix="multitask_prompt_tuning_",
    make_encoder=MultitaskPromptEmbedding,
)

__all__ = ["MultitaskPromptEmbedding", "MultitaskPromptTuningConfig", "MultitaskPromptTuningInit"]
