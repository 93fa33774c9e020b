"""`LoHaConfig`: HF PEFT's LoHa config fields and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from dpeft.config import PeftConfig
from dpeft.config.targets import TargetConfigMixin


@dataclass
class LoHaConfig(TargetConfigMixin, PeftConfig):
    """Configuration of a LoHa adapter: the delta weight is the Hadamard product of two rank-r products."""

    rank_pattern: dict[str, int] = field(default_factory=dict, metadata={"help": "Module regex -> rank."})
    alpha_pattern: dict[str, int] = field(default_factory=dict, metadata={"help": "Module regex -> alpha."})
    r: int = field(default=8, metadata={"help": "LoHa rank."})
    alpha: int = field(default=8, metadata={"help": "Scaling numerator: scaling = alpha / r."})
    rank_dropout: float = field(default=0.0, metadata={"help": "Dropout of output rows of the delta in training."})
    module_dropout: float = field(default=0.0, metadata={"help": "Probability of skipping the adapter in a step."})
    use_effective_conv2d: bool = field(default=False, metadata={"help": "CP-decomposed kernels for k>1 convs."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names (suffix match), a regex (full match), or 'all-linear'."}
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules never adapted."})
    init_weights: bool = field(default=True, metadata={"help": "True: delta starts at zero; False: random."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained and saved in full."})

    PEFT_TYPE: ClassVar[str] = "LOHA"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.normalize_targets()
        if self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r}")
