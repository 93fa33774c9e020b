"""`LoKrConfig`: HF PEFT's LoKr config fields and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from dpeft.config import PeftConfig
from dpeft.config.targets import TargetConfigMixin


@dataclass
class LoKrConfig(TargetConfigMixin, PeftConfig):
    """Configuration of a LoKr adapter: the delta weight is a Kronecker product of two (maybe low-rank) factors."""

    rank_pattern: dict[str, int] = field(default_factory=dict, metadata={"help": "Module regex -> rank."})
    alpha_pattern: dict[str, int] = field(default_factory=dict, metadata={"help": "Module regex -> alpha."})
    r: int = field(default=8, metadata={"help": "LoKr rank (of the factors that are decomposed)."})
    alpha: int = field(default=8, metadata={"help": "Scaling numerator: scaling = alpha / r."})
    rank_dropout: float = field(default=0.0, metadata={"help": "Dropout of output rows of the delta in training."})
    module_dropout: float = field(default=0.0, metadata={"help": "Probability of skipping the adapter in a step."})
    use_effective_conv2d: bool = field(default=False, metadata={"help": "CP-decomposed kernels for k>1 convs."})
    decompose_both: bool = field(default=False, metadata={"help": "Also decompose the left factor into rank r."})
    decompose_factor: int = field(default=-1, metadata={"help": "Kronecker factor size; -1: near the square root."})
    rank_dropout_scale: bool = field(default=False, metadata={"help": "Rescale rows kept by rank dropout."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names (suffix match), a regex (full match), or 'all-linear'."}
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules never adapted."})
    init_weights: bool | str = field(
        default=True, metadata={"help": "True: delta starts at zero; 'lycoris': LyCORIS's zero init; False: random."}
    )
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained and saved in full."})

    PEFT_TYPE: ClassVar[str] = "LOKR"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.normalize_targets()
        if self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r}")
        if self.init_weights not in (True, False, "lycoris"):
            raise ValueError(f"init_weights={self.init_weights!r} is not valid; use True, False or 'lycoris'")
