"""`IA3Config`: HF PEFT's (IA)^3 config fields and defaults."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

from dpeft.config import PeftConfig
from dpeft.config.targets import TargetConfigMixin

# HF PEFT's per-architecture (IA)^3 defaults (transformers `model_type` -> module names).
IA3_TARGET_MODULES: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"],
    "RefinedWebModel": ["query_key_value", "dense_4h_to_h"],
    "RefinedWeb": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
}
IA3_FEEDFORWARD_MODULES: dict[str, list[str]] = {
    "t5": ["wo"],
    "mt5": [],
    "gpt2": ["mlp.c_proj"],
    "bloom": ["mlp.dense_4h_to_h"],
    "roberta": ["output.dense"],
    "opt": ["fc2"],
    "gptj": ["fc_out"],
    "gpt_neox": ["dense_4h_to_h"],
    "gpt_neo": ["c_proj"],
    "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"],
    "llama": ["down_proj"],
    "llama4": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "bert": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "deberta": ["output.dense"],
    "RefinedWeb": ["dense_4h_to_h"],
    "RefinedWebModel": ["dense_4h_to_h"],
    "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
}


@dataclass
class IA3Config(TargetConfigMixin, PeftConfig):
    """Configuration of an (IA)^3 adapter: learned vectors that rescale layer outputs, or the inputs of
    `feedforward_modules`."""

    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names (suffix match), a regex (full match), or 'all-linear'."}
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules never adapted."})
    feedforward_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Targets whose INPUT is scaled (a subset of target_modules); None: per-model default."},
    )
    fan_in_fan_out: bool = field(default=False, metadata={"help": "True when the base weight is (in, out) (GPT-2)."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained and saved in full."})
    init_ia3_weights: bool = field(default=True, metadata={"help": "Start the vectors at 1 (identity); else random."})

    PEFT_TYPE: ClassVar[str] = "IA3"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.normalize_targets()
        ff = self.feedforward_modules
        if isinstance(ff, (set, frozenset, tuple)):
            ff = sorted(ff)
        if isinstance(ff, list):
            ff = list(dict.fromkeys(ff))
        self.feedforward_modules = ff
        if isinstance(ff, list) and isinstance(self.target_modules, list) and not set(ff) <= set(self.target_modules):
            raise ValueError(
                f"feedforward_modules {sorted(set(ff) - set(self.target_modules))} are not in target_modules; "
                "`feedforward_modules` should be a subset of `target_modules`"
            )

    def fill_model_defaults(self, model_type: str | None) -> None:
        """Fill `target_modules` / `feedforward_modules` left None from PEFT's (IA)^3 table for `model_type`."""
        if self.target_modules is None:
            if model_type not in IA3_TARGET_MODULES:
                raise ValueError(f"no (IA)^3 default target_modules for model_type {model_type!r}; set target_modules")
            self.target_modules = sorted(IA3_TARGET_MODULES[model_type])
        if self.feedforward_modules is None:
            if model_type not in IA3_FEEDFORWARD_MODULES:
                raise ValueError(
                    f"no (IA)^3 default feedforward_modules for model_type {model_type!r}; set feedforward_modules "
                    "(use [] when no target is a feedforward layer)"
                )
            self.feedforward_modules = sorted(IA3_FEEDFORWARD_MODULES[model_type])

    def is_feedforward(self, module_name: str) -> bool:
        """PEFT's rule: a regex must match the whole name; a list entry matches any name that ends with it."""
        ff = self.feedforward_modules
        if isinstance(ff, str):
            return re.fullmatch(ff, module_name) is not None
        return any(module_name.endswith(name) for name in ff or [])
