"""`OFTConfig`: HF PEFT's OFT config fields and defaults."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import ClassVar

from dpeft.config import PeftConfig
from dpeft.config.targets import TargetConfigMixin


@dataclass
class OFTConfig(TargetConfigMixin, PeftConfig):
    """Configuration of an OFT adapter: a block-diagonal orthogonal rotation of each adapted layer's input.

    Give either `r` (number of blocks) or `oft_block_size` (their size), not both: r * oft_block_size is the
    rotated dimension of each layer (in_features; in_channels * k * k for a convolution; embedding_dim).
    """

    r: int = field(default=0, metadata={"help": "Number of OFT blocks per layer (0: derived from oft_block_size)."})
    oft_block_size: int = field(default=32, metadata={"help": "Size of each OFT block (0: derived from r)."})
    module_dropout: float = field(
        default=0.0,
        metadata={"help": "Accepted for PEFT compatibility; PEFT 0.21.2 never applies it, so it has no effect."},
    )
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names (suffix match), a regex (full match), or 'all-linear'."}
    )
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Not used by OFT (nn.Linear stores (out, in))."})
    bias: str = field(default="none", metadata={"help": "Which biases train: 'none', 'all' or 'oft_only'."})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules never adapted."})
    init_weights: bool = field(default=True, metadata={"help": "True: identity rotation; False: random (normal)."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained and saved in full."})
    coft: bool = field(
        default=False, metadata={"help": "Constrained OFT: keep each rotation block within eps of the identity."}
    )
    eps: float = field(
        default=6e-5, metadata={"help": "COFT's rotation freedom: each skew block's norm is kept <= eps / sqrt(rows)."}
    )
    block_share: bool = field(default=False, metadata={"help": "One rotation block shared by all blocks."})
    use_cayley_neumann: bool = field(
        default=True, metadata={"help": "Truncated Neumann series instead of the exact Cayley transform."}
    )
    num_cayley_neumann_terms: int = field(default=5, metadata={"help": "Terms of the Neumann series."})

    PEFT_TYPE: ClassVar[str] = "OFT"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.normalize_targets()
        if self.bias not in ("none", "all", "oft_only"):
            raise ValueError(f"bias={self.bias!r} is not valid; use 'none', 'all' or 'oft_only'")
        if self.r < 0 or self.oft_block_size < 0:
            raise ValueError(
                f"r and oft_block_size must be >= 0, got r={self.r}, oft_block_size={self.oft_block_size}"
            )
        if (self.r != 0) == (self.oft_block_size != 0):
            raise ValueError(
                f"set exactly one of r ({self.r}) and oft_block_size ({self.oft_block_size}) to a non-zero value "
                "(the other is derived, since r * oft_block_size equals the layer dimension)"
            )
        if self.coft and self.eps < 0:
            raise ValueError(f"eps is the radius COFT keeps rotations within, so it must be >= 0; got {self.eps}")
        if self.init_weights not in (True, False):
            raise ValueError(f"init_weights must be True or False, got {self.init_weights!r}")
        if self.module_dropout:
            warnings.warn(
                f"module_dropout={self.module_dropout} has no effect: HF PEFT 0.21.2 builds OFT's dropout but never "
                "applies it, and dpeft matches its outputs",
                stacklevel=2,
            )
