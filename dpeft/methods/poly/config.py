"""`PolyConfig`: HF PEFT's Poly (Polytropon / Multi-Head Routing) config fields and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from dpeft.config import PeftConfig
from dpeft.config.targets import TargetConfigMixin


@dataclass
class PolyConfig(TargetConfigMixin, PeftConfig):
    """Configuration of a Poly adapter: per layer, an inventory of `n_skills` LoRA modules mixed per task by a
    learned router (`n_splits` > 1 routes each slice of the input/output features separately: Multi-Head Routing).
    Its forward needs ``task_ids`` (one task index per batch row), passed to the model's `forward` / `generate`."""

    r: int = field(default=8, metadata={"help": "Rank of each LoRA skill."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names (suffix match), a regex (full match), or 'all-linear'."}
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules never adapted."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained and saved in full."})
    init_weights: bool = field(
        default=True, metadata={"help": "True: the B matrices start at zero (no change); False: random."}
    )
    poly_type: str = field(default="poly", metadata={"help": "Router variant; only 'poly' exists."})
    n_tasks: int = field(default=1, metadata={"help": "Number of tasks (rows of the router's logits)."})
    n_skills: int = field(default=4, metadata={"help": "Number of LoRA skills per layer."})
    n_splits: int = field(default=1, metadata={"help": "Splits of each LoRA; > 1 is Multi-Head Routing."})

    PEFT_TYPE: ClassVar[str] = "POLY"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.normalize_targets()
        if self.poly_type != "poly":
            raise ValueError(f"poly_type={self.poly_type!r} is not supported; the only Poly router type is 'poly'")
        for name in ("r", "n_tasks", "n_skills", "n_splits"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.init_weights not in (True, False):
            raise ValueError(f"init_weights must be True or False, got {self.init_weights!r}")
