"""P-tuning's encoder: virtual-token embeddings through an MLP, or a bidirectional LSTM and an MLP."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dpeft.methods.p_tuning.config import PromptEncoderConfig
from dpeft.methods.prompt_base import PROMPT_KEY, PromptEncoder, embedding_spec, linear_specs
from dpeft.store import ADAPTER, ParamSpec


class PTuningEncoder(PromptEncoder):
    """Built for training: the embedding plus the encoder network (PEFT's `embedding`, `mlp_head`, `lstm_head`).
    Built for inference (`inference_mode`): only the embedding, which then holds the encoder's saved output."""

    def __init__(self, config: PromptEncoderConfig) -> None:
        super().__init__(config)
        dim, hidden = config.token_dim, config.encoder_hidden_size
        self.specs = [embedding_spec("embedding", self.total_virtual_tokens, dim)]
        self.has_encoder = not config.inference_mode
        self.lstm = config.encoder_reparameterization_type == "LSTM"
        self._lstm_skeleton = None
        if not self.has_encoder:
            return
        if self.lstm:
            self.specs += _lstm_specs(dim, hidden, config.encoder_num_layers)
            self.specs += linear_specs("mlp0", "mlp_head.0", 2 * hidden, 2 * hidden)
            self.specs += linear_specs("mlp2", "mlp_head.2", 2 * hidden, dim)
            with torch.device("meta"):  # only the module's structure: the tensors come from the store
                self._lstm_skeleton = nn.LSTM(
                    dim,
                    hidden,
                    config.encoder_num_layers,
                    dropout=config.encoder_dropout,
                    bidirectional=True,
                    batch_first=True,
                )
        else:
            self.specs += linear_specs("mlp0", "mlp_head.0", dim, hidden)
            self.specs += linear_specs("mlp2", "mlp_head.2", hidden, hidden)
            self.specs += linear_specs("mlp4", "mlp_head.4", hidden, dim)

    def output(self, p: dict[str, torch.Tensor], training: bool = False) -> torch.Tensor:
        x = p["embedding"]
        if not self.has_encoder:
            return x
        if self.lstm:
            weights = {s.name.removeprefix("lstm."): p[s.name] for s in self.specs if s.name.startswith("lstm.")}
            self._lstm_skeleton.train(training)
            x = functional_call(self._lstm_skeleton, weights, (x.unsqueeze(0),))[0][0]
            return _linear(F.relu(_linear(x, p, "mlp0")), p, "mlp2")
        x = F.relu(_linear(x, p, "mlp0"))
        x = F.relu(_linear(x, p, "mlp2"))
        return _linear(x, p, "mlp4")

    def load_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = super().load_state(state)
        if self.has_encoder:
            # PEFT saves only the encoder's output; loading it for training puts it where the encoder's input was
            # and leaves the encoder at its init, exactly as PEFT does.
            warnings.warn(
                f"the checkpoint holds the P-tuning encoder's output only ({PROMPT_KEY}); for training it is loaded "
                "as the encoder's input and the encoder restarts from its init, as in HF PEFT. Load with "
                "is_trainable=False for inference, or resume training from a dpeft distributed checkpoint.",
                stacklevel=2,
            )
        return out


def _linear(x: torch.Tensor, p: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return F.linear(x, p[f"{name}.weight"], p[f"{name}.bias"])


def _lstm_specs(dim: int, hidden: int, num_layers: int) -> list[ParamSpec]:
    """`nn.LSTM(bidirectional=True)`'s tensors in its registration order, with its uniform(+-1/sqrt(hidden)) init."""
    bound = 1 / hidden**0.5

    def init(t: torch.Tensor) -> None:
        nn.init.uniform_(t, -bound, bound)

    specs = []
    for layer in range(num_layers):
        width = dim if layer == 0 else 2 * hidden
        for suffix in ("", "_reverse"):
            shapes = {
                f"weight_ih_l{layer}{suffix}": (4 * hidden, width),
                f"weight_hh_l{layer}{suffix}": (4 * hidden, hidden),
                f"bias_ih_l{layer}{suffix}": (4 * hidden,),
                f"bias_hh_l{layer}{suffix}": (4 * hidden,),
            }
            specs += [
                ParamSpec(f"lstm.{n}", s, ("prompt_encoder", ADAPTER, "lstm_head", n), init) for n, s in shapes.items()
            ]
    return specs
