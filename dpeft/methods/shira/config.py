"""`ShiraConfig`: HF PEFT's SHiRA config fields and defaults."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import ClassVar

from dpeft.config import PeftConfig
from dpeft.config.targets import TargetConfigMixin

# Where PEFT's SHiRA default targets differ from the LoRA table every other method uses.
_DEFAULT_TARGETS = {"phi": ["q_proj", "v_proj"]}


@dataclass
class ShiraConfig(TargetConfigMixin, PeftConfig):
    """Configuration of a SHiRA adapter: a sparse, high-rank delta weight on a fixed mask of r * (in + out) entries
    (Bhardwaj et al., 2024).

    A `mask_type` other than ``"random"`` needs a mask function, set after construction as in PEFT:
    ``config.mask_fn = fn`` with ``fn(base_layer, r, **kwargs) -> mask`` (0/1, the base weight's (out, in) shape).
    """

    r: int = field(default=32, metadata={"help": "Sizes the mask like a LoRA rank: r * (in + out) trainable entries."})
    mask_type: str = field(default="random", metadata={"help": "'random', or any name with a custom `mask_fn`."})
    random_seed: int | None = field(default=None, metadata={"help": "Seed of the random mask."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names (suffix match), a regex (full match), or 'all-linear'."}
    )
    fan_in_fan_out: bool = field(default=False, metadata={"help": "True when the base weight is (in, out) (GPT-2)."})
    init_weights: bool = field(default=True, metadata={"help": "True: zeros (the identity); False: normal."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained and saved in full."})

    PEFT_TYPE: ClassVar[str] = "SHIRA"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.normalize_targets()
        if self.r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {self.r}")
        if not hasattr(self, "mask_fn"):
            self.mask_fn = None  # a user-set attribute, not a field (PEFT does not save it either)
        if self.mask_type != "random" and self.mask_fn is None and not self.inference_mode:
            warnings.warn(
                f"mask_type={self.mask_type!r} is not built in: set `config.mask_fn = my_mask_fn` before building "
                "the model (loading a saved adapter needs none: its indices are in the checkpoint).",
                stacklevel=2,
            )

    def fill_model_defaults(self, model_type: str | None) -> None:
        """PEFT's SHiRA table differs from LoRA's only for phi; the rest use the shared table."""
        if self.target_modules is None and model_type in _DEFAULT_TARGETS:
            self.target_modules = list(_DEFAULT_TARGETS[model_type])
