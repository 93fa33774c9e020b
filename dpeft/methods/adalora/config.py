"""`AdaLoraConfig`: HF PEFT's AdaLoRA config (LoRA's fields plus the rank budget schedule), same names and defaults."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import ClassVar

from dpeft.methods.lora.config import LoraConfig

# HF PEFT's per-architecture AdaLoRA defaults (transformers `model_type` -> module names); not LoRA's table.
ADALORA_TARGET_MODULES: dict[str, list[str] | str] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "gpt_bigcode": ["c_attn"],
    "deberta": ["in_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


@dataclass
class AdaLoraConfig(LoraConfig):
    """Configuration of an AdaLoRA adapter: SVD-form LoRA (P diag(E) Q) whose rank budget shrinks during training.

    Three phases, as in PEFT: `tinit` warm-up steps at the full budget (`init_r` per layer), a cubic budget
    decrease until step ``total_step - tfinal`` (masking the least important singular triplets every `deltaT`
    steps), then fine-tuning at the final budget (`target_r` per layer on average). Call
    ``model.base_model.update_and_allocate(step)`` after each ``loss.backward()`` (before ``zero_grad``).
    LoRA's `r`, `use_rslora`, `alpha_pattern` and `lora_bias` are ignored, as PEFT ignores them for AdaLoRA.
    """

    target_r: int = field(default=8, metadata={"help": "Target average rank of each incremental matrix."})
    init_r: int = field(default=12, metadata={"help": "Initial rank of each incremental matrix."})
    tinit: int = field(default=0, metadata={"help": "Steps of initial warm-up at the full rank budget."})
    tfinal: int = field(default=0, metadata={"help": "Steps of final fine-tuning at the final budget."})
    deltaT: int = field(default=1, metadata={"help": "Step interval between two budget allocations."})
    beta1: float = field(default=0.85, metadata={"help": "EMA coefficient of the sensitivity smoothing."})
    beta2: float = field(default=0.85, metadata={"help": "EMA coefficient of the uncertainty quantification."})
    orth_reg_weight: float = field(default=0.5, metadata={"help": "Weight of the orthogonal regularisation."})
    total_step: int | None = field(default=None, metadata={"help": "Total training steps (required)."})
    rank_pattern: dict | None = field(
        default=None,
        metadata={"help": "Allocated triplets: '<module>.lora_E' -> list of kept flags (written by the allocator)."},
    )

    PEFT_TYPE: ClassVar[str] = "ADALORA"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_dora:
            raise ValueError("ADALORA does not support DoRA; set use_dora=False")
        if self.r != 8:
            warnings.warn(
                "`r` is not used by AdaLoRA and is ignored; set the initial rank with `init_r`", stacklevel=2
            )
        if self.total_step is None or self.total_step <= 0:
            raise ValueError("AdaLoRA does not work when `total_step` is None; supply a value > 0")
        if self.orth_reg_weight < 0:
            raise ValueError(f"`orth_reg_weight` must be >= 0, got {self.orth_reg_weight}")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                "The supplied schedule values don't allow for a budgeting phase: tinit must be < total_step - tfinal; "
                "decrease `tfinal`/`tinit` or increase `total_step`"
            )
        if not 0 < self.beta1 < 1 or not 0 < self.beta2 < 1:
            raise ValueError(f"beta1 and beta2 must lie in (0, 1), got {self.beta1} and {self.beta2}")
        if self.init_r < 0 or self.target_r < 0 or self.deltaT <= 0:
            raise ValueError("init_r and target_r must be >= 0 and deltaT > 0")

    def fill_model_defaults(self, model_type: str | None) -> None:
        """Fill `target_modules` left None from PEFT's AdaLoRA table for `model_type`."""
        if self.target_modules is not None:
            return
        if model_type not in ADALORA_TARGET_MODULES:
            raise ValueError(f"no AdaLoRA default target_modules for model_type {model_type!r}; set target_modules")
        default = ADALORA_TARGET_MODULES[model_type]
        self.target_modules = sorted(default) if isinstance(default, list) else default

    def kept_triplets(self, module_name: str) -> list[bool] | None:
        """The rank pattern's kept-triplet flags of `module_name` (keys with or without the adapter name), or None."""
        for key, flags in (self.rank_pattern or {}).items():
            stem, _, _ = key.partition(".lora_E")
            if stem == module_name:
                return [bool(f) for f in flags]
        return None
