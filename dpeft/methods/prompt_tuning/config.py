"""`PromptTuningConfig`: HF PEFT's prompt-tuning config fields and defaults."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar

from dpeft.methods.prompt_base import PromptLearningConfig


class PromptTuningInit(str, enum.Enum):
    """How the virtual-token embeddings start: N(0, 1), random vocabulary rows, or the rows of a text's tokens."""

    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Configuration of prompt tuning: trainable virtual-token embeddings prepended to the input embeddings."""

    prompt_tuning_init: str = field(
        default=PromptTuningInit.RANDOM.value, metadata={"help": "RANDOM, SAMPLE_VOCAB or TEXT."}
    )
    prompt_tuning_init_text: str | None = field(default=None, metadata={"help": "The text of TEXT init."})
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer of TEXT init (a local path: dpeft never reaches a hub)."}
    )
    tokenizer_kwargs: dict | None = field(default=None, metadata={"help": "Extra tokenizer arguments (TEXT init)."})

    PEFT_TYPE: ClassVar[str] = "PROMPT_TUNING"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.prompt_tuning_init = getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)
        valid = [m.value for m in self._init_enum()]
        if self.prompt_tuning_init not in valid:
            raise ValueError(f"prompt_tuning_init={self.prompt_tuning_init!r} is not valid; use one of {valid}")
        text = self.prompt_tuning_init == PromptTuningInit.TEXT.value
        if text and not self.tokenizer_name_or_path:
            raise ValueError("prompt_tuning_init='TEXT' needs tokenizer_name_or_path (a local tokenizer directory)")
        if text and self.prompt_tuning_init_text is None:
            raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text")
        if self.tokenizer_kwargs and not text:
            raise ValueError("tokenizer_kwargs only apply with prompt_tuning_init='TEXT'")

    @classmethod
    def _init_enum(cls) -> type[enum.Enum]:
        return PromptTuningInit
