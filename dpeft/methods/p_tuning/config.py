"""`PromptEncoderConfig`: HF PEFT's P-tuning config fields and defaults."""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

from dpeft.methods.prompt_base import PromptLearningConfig


class PromptEncoderReparameterizationType(str, enum.Enum):
    """The network that turns the virtual-token embeddings into the prompt."""

    MLP = "MLP"
    LSTM = "LSTM"


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """Configuration of P-tuning: virtual-token embeddings reparameterised by an MLP or a bidirectional LSTM."""

    encoder_reparameterization_type: str = field(
        default=PromptEncoderReparameterizationType.MLP.value, metadata={"help": "MLP or LSTM."}
    )
    encoder_hidden_size: int | None = field(
        default=None, metadata={"help": "Hidden size of the encoder (default: token_dim)."}
    )
    encoder_num_layers: int = field(default=2, metadata={"help": "LSTM layers (the MLP always has 3 linears)."})
    encoder_dropout: float = field(default=0.0, metadata={"help": "Dropout between LSTM layers."})

    PEFT_TYPE: ClassVar[str] = "P_TUNING"

    def __post_init__(self) -> None:
        super().__post_init__()
        kind = getattr(self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type)
        valid = [m.value for m in PromptEncoderReparameterizationType]
        if kind not in valid:
            raise ValueError(f"encoder_reparameterization_type={kind!r} is not valid; use one of {valid}")
        self.encoder_reparameterization_type = kind
        if kind == "MLP" and self.encoder_num_layers != 2:
            warnings.warn(
                "encoder_num_layers is ignored for the MLP encoder, which always has 3 linears", stacklevel=2
            )
        if self.encoder_num_layers < 1:
            raise ValueError(f"encoder_num_layers={self.encoder_num_layers} must be at least 1")
