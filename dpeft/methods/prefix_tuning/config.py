"""`PrefixTuningConfig`: HF PEFT's prefix-tuning config fields and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from dpeft.methods.prompt_base import PromptLearningConfig


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Configuration of prefix tuning: trainable key/value prefixes for every attention layer."""

    init_weights: str | None = field(
        default=None, metadata={"help": "None: random prefixes; 'zero': the prefix (or the projection) starts at 0."}
    )
    encoder_hidden_size: int | None = field(
        default=None, metadata={"help": "Hidden size of the projection MLP (default: token_dim)."}
    )
    prefix_projection: bool = field(default=False, metadata={"help": "Reparameterise the prefix with a 2-layer MLP."})

    PEFT_TYPE: ClassVar[str] = "PREFIX_TUNING"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights={self.init_weights!r} is not valid; use None or 'zero'")
