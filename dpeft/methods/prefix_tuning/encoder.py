"""Prefix tuning's encoder: one (layers x 2 x token_dim) key/value prefix per virtual token, optionally the
output of a two-layer tanh MLP over smaller virtual-token embeddings (`prefix_projection`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpeft.methods.prefix_tuning.config import PrefixTuningConfig
from dpeft.methods.prompt_base import PROMPT_KEY, PromptEncoder, embedding_spec, linear_specs


class PrefixEncoder(PromptEncoder):
    """Built for training with `prefix_projection`: embedding + ``transform`` MLP; otherwise (or for inference)
    the embedding is the flattened prefix itself."""

    produces = "past_key_values"

    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__(config)
        width = config.num_layers * 2 * config.token_dim
        n = config.num_virtual_tokens
        zero = config.init_weights == "zero"
        self.projection = config.prefix_projection and not config.inference_mode
        if self.projection:
            hidden = config.encoder_hidden_size
            self.specs = [embedding_spec("embedding", n, config.token_dim)]
            self.specs += linear_specs("transform0", "transform.0", config.token_dim, hidden)
            self.specs += linear_specs("transform2", "transform.2", hidden, width)
            if zero:  # PEFT draws the default init first and then zeroes the last linear: draw the same numbers
                self.specs[-2:] = [_then_zero(s) for s in self.specs[-2:]]
        else:
            spec = embedding_spec("embedding", n, width)
            self.specs = [_then_zero(spec) if zero else spec]

    @property
    def total_virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens  # one prefix serves both stacks of an encoder-decoder model

    def output(self, p: dict[str, torch.Tensor], training: bool = False) -> torch.Tensor:
        if not self.projection:
            return p["embedding"]
        x = torch.tanh(F.linear(p["embedding"], p["transform0.weight"], p["transform0.bias"]))
        return F.linear(x, p["transform2.weight"], p["transform2.bias"])

    def load_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.projection:
            raise ValueError(
                f"a prefix-tuning checkpoint holds the projected prefix ({PROMPT_KEY}), from which the projection "
                "MLP cannot be recovered: load it with is_trainable=False, or resume training from a dpeft "
                "distributed checkpoint"
            )
        return super().load_state(state)


def _then_zero(spec):
    from dataclasses import replace

    first = spec.init

    def init(t: torch.Tensor) -> None:
        if first is not None:
            first(t)
        nn.init.zeros_(t)

    return replace(spec, init=init)
