"""`FourierFTConfig`: HF PEFT's FourierFT config fields and defaults."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

from dpeft.config import PeftConfig
from dpeft.config.targets import TargetConfigMixin

# Where PEFT's FourierFT default targets differ from the LoRA table every other method uses.
_DEFAULT_TARGETS = {"gpt2": ["mlp.c_proj"], "gpt_bigcode": ["mlp.c_proj"]}


@dataclass
class FourierFTConfig(TargetConfigMixin, PeftConfig):
    """Configuration of a FourierFT adapter: a sparse trainable spectrum whose inverse 2-D DFT is the delta weight."""

    n_frequency: int = field(default=1000, metadata={"help": "Number of trainable spectral entries per layer."})
    scaling: float = field(default=150.0, metadata={"help": "Multiplier of the delta weight."})
    random_loc_seed: int = field(default=777, metadata={"help": "Seed of the spectral entries' locations."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "True when the base weight is (in, out) (GPT-2)."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names (suffix match), a regex (full match), or 'all-linear'."}
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules never adapted."})
    bias: str = field(default="none", metadata={"help": "Which biases train: 'none', 'all' or 'fourier_only'."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained and saved in full."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    n_frequency_pattern: dict[str, int] = field(
        default_factory=dict, metadata={"help": "Module regex -> n_frequency."}
    )
    init_weights: bool = field(default=False, metadata={"help": "True: spectrum starts at zero; False: normal."})

    PEFT_TYPE: ClassVar[str] = "FOURIERFT"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.normalize_targets()
        if self.bias not in ("none", "all", "fourier_only"):
            raise ValueError(f"bias={self.bias!r} is not valid; use 'none', 'all' or 'fourier_only'")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")

    def fill_model_defaults(self, model_type: str | None) -> None:
        """PEFT's FourierFT table differs from LoRA's only for GPT-2-style models; the rest use the shared table."""
        if self.target_modules is None and model_type in _DEFAULT_TARGETS:
            self.target_modules = list(_DEFAULT_TARGETS[model_type])

    def n_frequency_for(self, module_name: str) -> int:
        """PEFT's `n_frequency_pattern` lookup: the first key that matches a dotted suffix of the module name."""
        for key, value in self.n_frequency_pattern.items():
            if re.match(rf".*\.{key}$", module_name):
                return value
        return self.n_frequency
