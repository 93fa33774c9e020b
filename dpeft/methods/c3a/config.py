"""`C3AConfig`: HF PEFT's C3A config fields and defaults."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

from dpeft.config import PeftConfig
from dpeft.config.targets import TargetConfigMixin

# Where PEFT's C3A default targets differ from the LoRA table every other method uses.
_DEFAULT_TARGETS = {"gpt2": ["mlp.c_proj"], "gpt_bigcode": ["mlp.c_proj"]}
INITS = (True, False, "gaussian", "kaiming_uniform", "xavier_uniform")


@dataclass
class C3AConfig(TargetConfigMixin, PeftConfig):
    """Configuration of a C3A adapter: the delta weight is a block-circulant matrix, applied as a circular
    convolution of each input block (Chen et al., 2025)."""

    block_size: int = field(
        default=256, metadata={"help": "Size of the circulant blocks; must divide each target's in and out features."}
    )
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names (suffix match), a regex (full match), or 'all-linear'."}
    )
    bias: str = field(default="none", metadata={"help": "Which biases train: 'none', 'all' or 'c3a_only'."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained and saved in full."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    block_size_pattern: dict[str, int] = field(default_factory=dict, metadata={"help": "Module regex -> block_size."})
    init_weights: bool | str = field(
        default="xavier_uniform",
        metadata={
            "help": "Kernel init: 'xavier_uniform' (or False), 'kaiming_uniform', 'gaussian', or True for zeros "
            "(the identity)."
        },
    )

    PEFT_TYPE: ClassVar[str] = "C3A"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.normalize_targets()
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        if self.init_weights not in INITS:
            raise ValueError(f"Unknown init_weights: {self.init_weights!r}; use one of {INITS}")
        if self.bias not in ("none", "all", "c3a_only"):
            raise ValueError(f"bias={self.bias!r} is not valid; use 'none', 'all' or 'c3a_only'")

    def fill_model_defaults(self, model_type: str | None) -> None:
        """PEFT's C3A table differs from LoRA's only for GPT-2-style models; the rest use the shared table."""
        if self.target_modules is None and model_type in _DEFAULT_TARGETS:
            self.target_modules = list(_DEFAULT_TARGETS[model_type])

    def block_size_for(self, module_name: str) -> int:
        """PEFT's `block_size_pattern` lookup: the first key that matches a dotted suffix of the module name."""
        for key, value in self.block_size_pattern.items():
            if re.match(rf".*\.{key}$", module_name):
                return value
        return self.block_size
