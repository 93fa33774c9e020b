"""`LoraConfig`: HF PEFT's LoRA config fields and defaults (LoRA, rsLoRA, DoRA)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from dpeft.config import PeftConfig
from dpeft.config.targets import TargetConfigMixin

# PEFT fields for LoRA features dpeft does not implement, with the value that means "off". A config that
# turns one on is refused (its outputs could not match PEFT's); at its default it is kept and ignored.
_UNIMPLEMENTED_DEFAULTS: dict[str, Any] = {
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "trainable_token_indices": None,
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "qalora_group_size": 16,
    "monteclora_config": None,
    "layer_replication": None,
    "runtime_config": None,
    "target_parameters": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "ensure_weight_tying": False,
}


@dataclass
class LoraConfig(TargetConfigMixin, PeftConfig):
    """Configuration of a LoRA adapter (also rsLoRA with `use_rslora`, DoRA with `use_dora`)."""

    r: int = field(default=8, metadata={"help": "LoRA rank."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names (suffix match), a regex (full match), or 'all-linear'; None: per-model default."
        },
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules never adapted."})
    lora_alpha: int = field(default=8, metadata={"help": "Scaling numerator: scaling = lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch input."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "True when the base weight is (in, out) (GPT-2)."})
    bias: str = field(default="none", metadata={"help": "Which biases train: 'none', 'all' or 'lora_only'."})
    use_rslora: bool = field(default=False, metadata={"help": "rsLoRA: scaling = lora_alpha / sqrt(r)."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained and saved in full."})
    init_lora_weights: bool | str = field(
        default=True, metadata={"help": "True (kaiming A, zero B), 'gaussian' (normal A, zero B) or False (random)."}
    )
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    rank_pattern: dict[str, int] = field(default_factory=dict, metadata={"help": "Module regex -> rank."})
    alpha_pattern: dict[str, int] = field(default_factory=dict, metadata={"help": "Module regex -> alpha."})
    use_dora: bool = field(default=False, metadata={"help": "DoRA: weight-decomposed low-rank adaptation."})
    lora_bias: bool = field(default=False, metadata={"help": "Train a bias on lora_B."})

    PEFT_TYPE: ClassVar[str] = "LORA"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.normalize_targets()
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias={self.bias!r} is not valid; use 'none', 'all' or 'lora_only'")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} is not implemented in dpeft; "
                "use True, False or 'gaussian'"
            )
        if self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        turned_on = {
            k: data[k]
            for k in _UNIMPLEMENTED_DEFAULTS
            if k in data and data[k] not in (_UNIMPLEMENTED_DEFAULTS[k], None, {}, False)
        }
        if turned_on:
            raise ValueError(
                f"this LoRA config uses PEFT features dpeft does not implement: {turned_on}; "
                "remove them (or set them to their defaults) to load it"
            )
        # Kept (silently: they are at their "off" values) so that PEFT's JSON saves back unchanged.
        off = {k: v for k, v in data.items() if k in _UNIMPLEMENTED_DEFAULTS}
        config = super().from_dict({k: v for k, v in data.items() if k not in _UNIMPLEMENTED_DEFAULTS})
        config.extra_fields = {**off, **config.extra_fields}
        return config
