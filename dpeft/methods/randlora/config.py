"""`RandLoraConfig`: HF PEFT's RandLoRA config fields and defaults."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import ClassVar

from dpeft.config import PeftConfig
from dpeft.config.targets import TargetConfigMixin


@dataclass
class RandLoraConfig(TargetConfigMixin, PeftConfig):
    """Configuration of a RandLoRA adapter: full-rank updates from frozen random bases shared by all layers, scaled
    per layer by trainable diagonal matrices (Albert et al., 2025)."""

    r: int = field(default=32, metadata={"help": "Rank of each random basis (fewer, larger bases when higher)."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names (suffix match), a regex (full match), or 'all-linear'."}
    )
    projection_prng_key: int = field(
        default=0, metadata={"help": "Seed of the shared bases (regenerated from it when they are not saved)."}
    )
    save_projection: bool = field(
        default=True, metadata={"help": "Save the bases in the checkpoint (else regenerate them from the key)."}
    )
    sparse: bool = field(default=False, metadata={"help": "Ternary sparse bases (1/3 non-zero)."})
    very_sparse: bool = field(default=False, metadata={"help": "Ternary bases with 1/sqrt(min dim) non-zero."})
    randlora_dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the layer input."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "True when the base weight is (in, out) (GPT-2)."})
    randlora_alpha: int = field(default=640, metadata={"help": "Scaling numerator: the update is scaled by alpha/r."})
    bias: str = field(default="none", metadata={"help": "Which biases train: 'none', 'all' or 'randlora_only'."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained and saved in full."})
    init_weights: bool = field(
        default=True, metadata={"help": "True: lambda = 0 (identity), gamma constant; False: lambda normal."}
    )
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})

    PEFT_TYPE: ClassVar[str] = "RANDLORA"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.normalize_targets()
        if self.r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {self.r}")
        if self.bias not in ("none", "all", "randlora_only"):
            raise ValueError(f"bias={self.bias!r} is not valid; use 'none', 'all' or 'randlora_only'")
        if not self.save_projection:
            warnings.warn(
                "save_projection=False: the RandLoRA bases are not saved but regenerated from projection_prng_key, "
                "which may not give the same values on every system; set save_projection=True to be sure.",
                stacklevel=2,
            )
