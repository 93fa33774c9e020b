"""What every prompt-learning method shares: the config fields PEFT's `PromptLearningConfig` has, and the
`PromptEncoder` protocol through which `dpeft.model.prompt` asks a method for its virtual tokens.

A prompt-learning method adapts no layer. Its tensors (a virtual-token embedding, maybe an encoder network) are
declared to the store as `ParamSpec`s like any layer method's, so the sharded backend and distributed checkpoints
work unchanged; the encoder turns them into the prompt: embeddings prepended to the input, or per-layer key/value
prefixes. How the prompt enters the model (masks, labels, caches, generation) is written once in `dpeft.model`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from dpeft.config import PeftConfig
from dpeft.store import ADAPTER, ParamSpec

#: The one key PEFT saves for every prompt-learning method: the prompt the encoder produces.
PROMPT_KEY = "prompt_embeddings"


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields of HF PEFT's `PromptLearningConfig`; None means "read it off the base model's config"."""

    num_virtual_tokens: int | None = field(default=None, metadata={"help": "Number of virtual tokens."})
    token_dim: int | None = field(default=None, metadata={"help": "Hidden size of the base model."})
    num_transformer_submodules: int | None = field(
        default=None, metadata={"help": "1 for decoder-only/encoder models, 2 for encoder-decoder models."}
    )
    num_attention_heads: int | None = field(default=None, metadata={"help": "Attention heads of the base model."})
    num_layers: int | None = field(default=None, metadata={"help": "Layers of the base model."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained and saved in full."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        for name in ("num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name}={value!r} must be a positive integer (or None to take the model's)")
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ValueError(f"num_transformer_submodules={self.num_transformer_submodules!r} must be 1, 2 or None")

    @property
    def is_prompt_learning(self) -> bool:
        return True


def embedding_spec(name: str, rows: int, dim: int, module: str = "embedding", **kw) -> ParamSpec:
    """An `nn.Embedding` weight of the encoder (``prompt_encoder.<adapter>.<module>.weight``), init N(0, 1)."""
    return ParamSpec(name, (rows, dim), ("prompt_encoder", ADAPTER, *module.split("."), "weight"), _normal, **kw)


def linear_specs(prefix: str, module: str, in_features: int, out_features: int) -> list[ParamSpec]:
    """Weight and bias of an `nn.Linear` at ``prompt_encoder.<adapter>.<module>``, with torch's default init."""
    path = ("prompt_encoder", ADAPTER, *module.split("."))
    bound = 1 / in_features**0.5 if in_features > 0 else 0.0
    return [
        ParamSpec(f"{prefix}.weight", (out_features, in_features), (*path, "weight"), _kaiming_uniform),
        ParamSpec(f"{prefix}.bias", (out_features,), (*path, "bias"), lambda t: nn.init.uniform_(t, -bound, bound)),
    ]


def _normal(t: torch.Tensor) -> None:
    nn.init.normal_(t)


def _kaiming_uniform(t: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=5**0.5)  # nn.Linear's default init, drawn in the same order as PEFT's modules


class PromptEncoder:
    """One prompt-learning adapter: its parameter specs and the prompt they produce.

    Subclasses set `specs` and, where the prompt is not simply the ``embedding`` tensor, override `output`,
    `saved_state` and `load_state`. Like `MethodLayer` it is a plain object: its tensors reach it as `p`.

    Args:
        config: The adapter's config, with the model-derived fields already filled in.
    """

    #: ``"embeddings"``: virtual-token embeddings prepended to the input; ``"past_key_values"``: per-layer
    #: key/value prefixes, given to the model as a cache.
    produces: ClassVar[str] = "embeddings"
    #: Whether, on encoder-decoder models, the second half of the prompt goes in front of the decoder's inputs
    #: (multitask prompt tuning) instead of going unused (prompt tuning, P-tuning), as in PEFT.
    decoder_prompt: ClassVar[bool] = False

    def __init__(self, config: PromptLearningConfig) -> None:
        self.config = config
        self.specs: list[ParamSpec] = []

    @property
    def total_virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens * self.config.num_transformer_submodules

    def after_allocation(self, p: dict[str, torch.Tensor], word_embeddings: nn.Module | None) -> None:
        """Fill tensors that depend on the base model (e.g. from its word embeddings); called after fresh init."""

    def output(self, p: dict[str, torch.Tensor], training: bool = False) -> torch.Tensor:
        """The prompt of one sample, (virtual tokens, width): by default the ``embedding`` tensor itself."""
        return p["embedding"]

    def prompt(
        self, p: dict[str, torch.Tensor], batch_size: int, task_ids: torch.Tensor | None = None, training: bool = False
    ) -> torch.Tensor:
        """The prompt of a batch, (batch, virtual tokens, width): one sample's, shared by every row."""
        out = self.output(p, training)
        return out.unsqueeze(0).expand(batch_size, *out.shape)

    def saved_state(self, p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What PEFT saves: the encoder's output under `PROMPT_KEY` (so the file is the same whether or not the
        adapter was built for inference)."""
        return {PROMPT_KEY: self.output(p).detach()}

    def load_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Spec name -> tensor to load, from a PEFT-format state (`PROMPT_KEY`, ...).

        Raises:
            ValueError: if a key is missing, or the state cannot fill this encoder's tensors.
        """
        if PROMPT_KEY not in state:
            raise ValueError(f"the checkpoint has no {PROMPT_KEY!r}; found keys: {sorted(state)[:5]}")
        return {"embedding": state[PROMPT_KEY]}
