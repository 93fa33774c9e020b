"""`VeraConfig`: HF PEFT's VeRA config fields and defaults."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import ClassVar

from dpeft.config import PeftConfig
from dpeft.config.targets import TargetConfigMixin

# Where PEFT's VeRA default targets differ from the LoRA table every other method uses.
_DEFAULT_TARGETS = {"phi": ["q_proj", "v_proj"]}


@dataclass
class VeraConfig(TargetConfigMixin, PeftConfig):
    """Configuration of a VeRA adapter: frozen random projections shared by all layers, scaled per layer by two
    trainable vectors (Kopiczko et al., 2024)."""

    r: int = field(default=256, metadata={"help": "Rank of the shared projections (use more than a LoRA rank)."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names (suffix match), a regex (full match), or 'all-linear'."}
    )
    projection_prng_key: int = field(
        default=0,
        metadata={"help": "Seed of the shared projections vera_A / vera_B (regenerated from it if unsaved)."},
    )
    save_projection: bool = field(
        default=True, metadata={"help": "Save vera_A / vera_B in the checkpoint (else regenerate them from the key)."}
    )
    vera_dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the layer input."})
    d_initial: float = field(default=0.1, metadata={"help": "Initial value of every entry of vera_lambda_d."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "True when the base weight is (in, out) (GPT-2)."})
    bias: str = field(default="none", metadata={"help": "Which biases train: 'none', 'all' or 'vera_only'."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained and saved in full."})
    init_weights: bool = field(
        default=True, metadata={"help": "True: lambda_b = 0, lambda_d = d_initial (identity); False: random."}
    )
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})

    PEFT_TYPE: ClassVar[str] = "VERA"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.normalize_targets()
        if self.r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {self.r}")
        if self.bias not in ("none", "all", "vera_only"):
            raise ValueError(f"bias={self.bias!r} is not valid; use 'none', 'all' or 'vera_only'")
        if not self.save_projection:
            warnings.warn(
                "save_projection=False: vera_A and vera_B are not saved but regenerated from projection_prng_key, "
                "which may not give the same values on every system; set save_projection=True to be sure.",
                stacklevel=2,
            )

    def fill_model_defaults(self, model_type: str | None) -> None:
        """PEFT's VeRA table differs from LoRA's only for phi; the rest use the shared table."""
        if self.target_modules is None and model_type in _DEFAULT_TARGETS:
            self.target_modules = list(_DEFAULT_TARGETS[model_type])
