"""`VBLoRAConfig`: HF PEFT's VB-LoRA config fields and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from dpeft.config import PeftConfig
from dpeft.config.targets import TargetConfigMixin

# Where PEFT's VB-LoRA default targets differ from the LoRA table every other method uses.
_DEFAULT_TARGETS = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
}


@dataclass
class VBLoRAConfig(TargetConfigMixin, PeftConfig):
    """Configuration of a VB-LoRA adapter: LoRA factors whose sub-vectors are top-k mixtures of one trainable vector
    bank shared by all layers (Li et al., 2024)."""

    r: int = field(default=4, metadata={"help": "Rank of the LoRA factors."})
    num_vectors: int = field(default=256, metadata={"help": "Number of vectors in the shared bank."})
    vector_length: int = field(
        default=256, metadata={"help": "Length of each bank vector; must divide every target's in and out features."}
    )
    topk: int = field(default=2, metadata={"help": "Number of bank vectors mixed into each sub-vector."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names (suffix match), a regex (full match), or 'all-linear'."}
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules never adapted."})
    save_only_topk_weights: bool = field(
        default=False,
        metadata={"help": "Save only the top-k indices and weights of the logits (smaller; inference only)."},
    )
    vblora_dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the layer input."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "True when the base weight is (in, out) (GPT-2)."})
    bias: str = field(default="none", metadata={"help": "Which biases train: 'none', 'all' or 'vblora_only'."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained and saved in full."})
    init_vector_bank_bound: float = field(
        default=0.02, metadata={"help": "The bank starts uniform in [-bound, bound]."}
    )
    init_logits_std: float = field(default=0.1, metadata={"help": "Standard deviation of the initial logits."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})

    PEFT_TYPE: ClassVar[str] = "VBLORA"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.normalize_targets()
        for name in ("r", "topk", "num_vectors", "vector_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` {getattr(self, name)} should be a positive integer value")
        if self.topk > self.num_vectors:
            raise ValueError(f"`topk` {self.topk} cannot exceed `num_vectors` {self.num_vectors}")
        if self.bias not in ("none", "all", "vblora_only"):
            raise ValueError(f"bias={self.bias!r} is not valid; use 'none', 'all' or 'vblora_only'")

    def fill_model_defaults(self, model_type: str | None) -> None:
        """PEFT's VB-LoRA table differs from LoRA's for a few encoder-decoder models; the rest use the shared table."""
        if self.target_modules is None and model_type in _DEFAULT_TARGETS:
            self.target_modules = list(_DEFAULT_TARGETS[model_type])
