"""`HRAConfig`: HF PEFT's HRA config fields and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from dpeft.config import PeftConfig
from dpeft.config.targets import TargetConfigMixin


@dataclass
class HRAConfig(TargetConfigMixin, PeftConfig):
    """Configuration of an HRA adapter: the base weight times a chain of r Householder reflections."""

    r: int = field(
        default=8, metadata={"help": "Number of Householder reflections per layer (even for the identity init)."}
    )
    apply_GS: bool = field(default=False, metadata={"help": "Orthonormalise the reflection vectors (Gram-Schmidt)."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names (suffix match), a regex (full match), or 'all-linear'."}
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules never adapted."})
    init_weights: bool = field(
        default=True, metadata={"help": "True: pairs of equal vectors (the identity, needs an even r); False: random."}
    )
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    bias: str = field(default="none", metadata={"help": "Which biases train: 'none', 'all' or 'hra_only'."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained and saved in full."})

    PEFT_TYPE: ClassVar[str] = "HRA"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.normalize_targets()
        if self.bias not in ("none", "all", "hra_only"):
            raise ValueError(f"bias={self.bias!r} is not valid; use 'none', 'all' or 'hra_only'")
        if self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r}")
        if self.init_weights not in (True, False):
            raise ValueError(f"init_weights must be True or False, got {self.init_weights!r}")
