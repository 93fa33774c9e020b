"""`MissConfig`: HF PEFT's MiSS config (formerly Bone) fields and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from dpeft.config import PeftConfig
from dpeft.config.targets import TargetConfigMixin


@dataclass
class MissConfig(TargetConfigMixin, PeftConfig):
    """Configuration of a MiSS adapter: a shared block added to every r-column slice of the weight (default), a
    block shared along out_features too (`init_weights="mini"`), or block-wise W B + B updates (`"bat"`)."""

    r: int = field(default=64, metadata={"help": "Block size along in_features."})
    miss_dropout: float = field(default=0.0, metadata={"help": "Dropout on the MiSS branch input."})
    mini_r: int = field(default=1, metadata={"help": "Block size along out_features for init_weights='mini'."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names (suffix match), a regex (full match), or 'all-linear'."}
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules never adapted."})
    init_weights: bool | str = field(
        default=True, metadata={"help": "True: zeros (identity); False: random; 'bat' or 'mini': those variants."}
    )
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    bias: str = field(default="none", metadata={"help": "Which biases train: 'none', 'all' or 'MiSS_only'."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained and saved in full."})

    PEFT_TYPE: ClassVar[str] = "MISS"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        self.normalize_targets()
        if self.init_weights not in (True, False, "bat", "mini"):
            raise ValueError(f"init_weights={self.init_weights!r} is not valid; use True, False, 'bat' or 'mini'")
        if self.r <= 0 or self.mini_r <= 0:
            raise ValueError(f"r and mini_r must be positive integers, got r={self.r}, mini_r={self.mini_r}")
