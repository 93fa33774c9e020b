"""`BOFTConfig`: HF PEFT's BOFT config fields and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from dpeft.config import PeftConfig
from dpeft.config.targets import TargetConfigMixin


@dataclass
class BOFTConfig(TargetConfigMixin, PeftConfig):
    """Configuration of a BOFT adapter: a product of butterfly-permuted block-diagonal orthogonal rotations of each
    layer's input, and a learned scale of its output features.

    Give either `boft_block_size` or `boft_block_num` (their product is the rotated dimension of each layer).
    """

    boft_block_size: int = field(default=4, metadata={"help": "Size of each BOFT block (0: from boft_block_num)."})
    boft_block_num: int = field(default=0, metadata={"help": "Number of BOFT blocks (0: from boft_block_size)."})
    boft_n_butterfly_factor: int = field(
        default=1,
        metadata={
            "help": "Number of butterfly factors (1: one block-diagonal rotation, as OFT). HF PEFT uses values > 1 "
            "only where its CUDA extension builds and silently uses 1 elsewhere; dpeft always uses the value given."
        },
    )
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names (suffix match), a regex (full match), or 'all-linear'."}
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules never adapted."})
    boft_dropout: float = field(default=0.0, metadata={"help": "Share of blocks set to the identity in training."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Not used by BOFT (nn.Linear stores (out, in))."})
    bias: str = field(default="none", metadata={"help": "Which biases train: 'none', 'all' or 'boft_only'."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained and saved in full."})
    init_weights: bool = field(default=True, metadata={"help": "True: identity (R=0, s=1); False: random."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})

    PEFT_TYPE: ClassVar[str] = "BOFT"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.normalize_targets()
        if self.bias not in ("none", "all", "boft_only"):
            raise ValueError(f"bias={self.bias!r} is not valid; use 'none', 'all' or 'boft_only'")
        if self.boft_block_size < 0 or self.boft_block_num < 0:
            raise ValueError("boft_block_size and boft_block_num must be >= 0")
        if (self.boft_block_size != 0) == (self.boft_block_num != 0):
            raise ValueError(
                f"set exactly one of boft_block_size ({self.boft_block_size}) and boft_block_num "
                f"({self.boft_block_num}) to a non-zero value (their product is the layer dimension)"
            )
        if self.boft_n_butterfly_factor < 1:
            raise ValueError(f"boft_n_butterfly_factor must be a positive integer, got {self.boft_n_butterfly_factor}")
        if not 0.0 <= self.boft_dropout < 1.0:
            raise ValueError(f"boft_dropout must be in [0, 1), got {self.boft_dropout}")
        if self.init_weights not in (True, False):
            raise ValueError(f"init_weights must be True or False, got {self.init_weights!r}")
