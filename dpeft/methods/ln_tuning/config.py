"""`LNTuningConfig`: HF PEFT's LayerNorm-tuning config fields and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from dpeft.config import PeftConfig
from dpeft.config.targets import TargetConfigMixin

# HF PEFT's per-architecture LN-tuning targets (transformers `model_type` -> module names).
LN_TUNING_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "bloom": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "t5": ["layer_norm", "final_layer_norm"],
    "mt5": ["layer_norm", "final_layer_norm"],
    "bart": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
    "gptj": ["ln_1", "ln_f"],
    "blip-2": ["layernorm", "LayerNorm", "final_layer_norm", "self_attn_layer_norm"],
    "falcon": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "mistral": ["input_layernorm", "post_attention_layernorm", "norm"],
    "phi": ["input_layernorm", "final_layernorm"],
    "gemma": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gemma2": [
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
        "norm",
    ],
    "gemma3_text": [
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
        "norm",
    ],
    "qwen2": ["post_attention_layernorm"],
    "qwen3": ["post_attention_layernorm"],
}


@dataclass
class LNTuningConfig(TargetConfigMixin, PeftConfig):
    """Configuration of LayerNorm tuning: each targeted normalisation layer gets its own trainable copy."""

    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Norm layers to tune (suffix match or full-match regex); None: per-model."}
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules never adapted."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained and saved in full."})

    PEFT_TYPE: ClassVar[str] = "LN_TUNING"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.normalize_targets()

    def fill_model_defaults(self, model_type: str | None) -> None:
        """Fill `target_modules` left None from PEFT's LN-tuning table for `model_type`."""
        if self.target_modules is None:
            if model_type not in LN_TUNING_TARGET_MODULES:
                raise ValueError(
                    f"no LN-tuning default target_modules for model_type {model_type!r}; set target_modules"
                )
            self.target_modules = sorted(LN_TUNING_TARGET_MODULES[model_type])
