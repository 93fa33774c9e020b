"""`DeloraConfig`: HF PEFT's DeLoRA config fields and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from dpeft.config import PeftConfig
from dpeft.config.targets import TargetConfigMixin


@dataclass
class DeloraConfig(TargetConfigMixin, PeftConfig):
    """Configuration of a DeLoRA adapter: a low-rank change whose rank-1 terms are normalised and bounded by a
    learned `delora_lambda`, scaled by the base weight's column norms."""

    r: int = field(default=8, metadata={"help": "DeLoRA rank."})
    delora_lambda: int = field(default=15, metadata={"help": "Initial bound of the change's norm (trainable)."})
    module_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter branch input in training."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names (suffix match), a regex (full match), or 'all-linear'."}
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules never adapted."})
    bias: str = field(default="none", metadata={"help": "Which biases train: 'none', 'all' or 'delora_only'."})
    init_weights: bool = field(default=True, metadata={"help": "True: B starts at zero (no change); False: random."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    rank_pattern: dict[str, int] = field(default_factory=dict, metadata={"help": "Module regex -> rank."})
    lambda_pattern: dict[str, float] = field(default_factory=dict, metadata={"help": "Module regex -> lambda."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained and saved in full."})

    PEFT_TYPE: ClassVar[str] = "DELORA"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.normalize_targets()
        if self.bias not in ("none", "all", "delora_only"):
            raise ValueError(f"bias={self.bias!r} is not valid; use 'none', 'all' or 'delora_only'")
        if self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r}")
        if not 0.0 <= self.module_dropout < 1.0:
            raise ValueError(f"module_dropout must be in [0, 1), got {self.module_dropout}")
        if self.init_weights not in (True, False):
            raise ValueError(f"init_weights must be True or False, got {self.init_weights!r}")
