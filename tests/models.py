"""Tiny models (built from configs, no downloads) and their example inputs, shared by all tests."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """Linear layers plus a head: the smallest model most methods fit."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 20, bias=bias)
        self.lin2 = nn.Linear(20, 2, bias=bias)

    def forward(self, X):
        return self.lin2(self.relu(self.lin1(self.relu(self.lin0(X)))))


class SeqMLP(nn.Module):
    """Token embeddings through linear layers, with a transformers-style signature (keyword inputs, extras
    ignored): the custom model for methods whose layers need 3-D inputs (Poly) under PEFT's task classes."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 12)
        self.lin0 = nn.Linear(12, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 20)
        self.lin2 = nn.Linear(20, 2)

    def forward(self, input_ids=None, **kwargs):
        return self.lin2(self.relu(self.lin1(self.relu(self.lin0(self.emb(input_ids))))))


class EmbConv1D(nn.Module):
    """An embedding followed by a transformers `Conv1D` (GPT-2's linear layer)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(1, 5)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, X):
        h = self.emb(X)
        h = self.conv1d(h)
        return self.lin0(h.flatten(1))


class Conv1dModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 5)
        self.conv1d = nn.Conv1d(5, 10, 3, padding=1)
        self.lin0 = nn.Linear(100, 2)

    def forward(self, X):
        h = self.emb(X).transpose(1, 2)
        return self.lin0(self.conv1d(h).flatten(1))


class Conv2dModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(5, 10, 3)
        self.conv2d_1x1 = nn.Conv2d(10, 10, 1)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, X):
        h = self.conv2d_1x1(self.conv2d(X))
        return self.lin0(h.mean(dim=(2, 3)))


class Conv2dGroupNorm(nn.Module):
    """Convolutions with a GroupNorm between them (a norm layer that is neither LayerNorm nor RMSNorm)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(5, 8, 3)
        self.norm = nn.GroupNorm(2, 8)
        self.lin0 = nn.Linear(8, 2)

    def forward(self, X):
        return self.lin0(self.norm(self.conv2d(X)).mean(dim=(2, 3)))


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
        )
    )


def tiny_bert_classifier(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(
        BertConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=32,
            num_labels=3,
        )
    ).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32))


def tiny_t5(seed: int = 0):
    """A 2+2-layer T5 encoder-decoder (SEQ_2_SEQ_LM)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5ForConditionalGeneration(config)


def tiny_bart(seed: int = 0):
    """A 2+2-layer BART encoder-decoder (SEQ_2_SEQ_LM)."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=64,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=None,
    )
    return BartForConditionalGeneration(config)


# name -> (builder(seed) -> model, inputs(generator) -> kwargs for forward)
MODELS = {
    "mlp": (lambda seed=0: _seeded(MLP, seed), lambda g: {"X": torch.randn(4, 10, generator=g)}),
    "emb_conv1d": (
        lambda seed=0: _seeded(EmbConv1D, seed),
        lambda g: {"X": torch.randint(0, 100, (4, 10), generator=g)},
    ),
    "conv1d": (
        lambda seed=0: _seeded(Conv1dModel, seed),
        lambda g: {"X": torch.randint(0, 100, (4, 10), generator=g)},
    ),
    "conv2d": (lambda seed=0: _seeded(Conv2dModel, seed), lambda g: {"X": torch.randn(4, 5, 6, 6, generator=g)}),
    "conv2d_groupnorm": (
        lambda seed=0: _seeded(Conv2dGroupNorm, seed),
        lambda g: {"X": torch.randn(4, 5, 6, 6, generator=g)},
    ),
    "llama": (tiny_llama, lambda g: {"input_ids": torch.randint(0, 64, (2, 8), generator=g)}),
    "bert": (tiny_bert_classifier, lambda g: {"input_ids": torch.randint(0, 64, (2, 8), generator=g)}),
    "gpt2": (tiny_gpt2, lambda g: {"input_ids": torch.randint(0, 64, (2, 8), generator=g)}),
    # Inputs with one task index per row, for methods routed by task (Poly; the base models ignore task_ids).
    "seq_mlp_tasks": (
        lambda seed=0: _seeded(SeqMLP, seed),
        lambda g: {"input_ids": torch.randint(0, 100, (4, 5), generator=g), "task_ids": torch.tensor([0, 2, 1, 2])},
    ),
    "llama_tasks": (
        tiny_llama,
        lambda g: {"input_ids": torch.randint(0, 64, (2, 8), generator=g), "task_ids": torch.tensor([1, 0])},
    ),
    "t5": (
        tiny_t5,
        lambda g: {
            "input_ids": torch.randint(0, 64, (2, 8), generator=g),
            "decoder_input_ids": torch.randint(0, 64, (2, 5), generator=g),
        },
    ),
    "t5_tasks": (
        tiny_t5,
        lambda g: {
            "input_ids": torch.randint(0, 64, (2, 8), generator=g),
            "decoder_input_ids": torch.randint(0, 64, (2, 5), generator=g),
            "task_ids": torch.tensor([1, 0]),
        },
    ),
    "bert_tasks": (
        tiny_bert_classifier,
        lambda g: {"input_ids": torch.randint(0, 64, (2, 8), generator=g), "task_ids": torch.tensor([0, 1])},
    ),
}


def _seeded(cls, seed: int):
    torch.manual_seed(seed)
    return cls().eval()


def build(name: str, seed: int = 0):
    """(model in eval mode, example forward kwargs) for a model of `MODELS`."""
    builder, inputs = MODELS[name]
    model = builder(seed).eval()
    return model, inputs(torch.Generator().manual_seed(seed + 1))


def output(model, kwargs) -> torch.Tensor:
    """The main output tensor of any test model."""
    out = model(**kwargs)
    return out if isinstance(out, torch.Tensor) else out.logits


def real_positions(outputs: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """The part of `outputs` that has a counterpart in the base model's outputs `base`.

    A prompt-learning adapter on a causal LM returns outputs for its virtual tokens too, in front of the real ones
    (as HF PEFT does); those are dropped. Outputs of the base's shape are returned unchanged.
    """
    if outputs.shape == base.shape:
        return outputs
    extra = outputs.shape[1] - base.shape[1] if outputs.dim() == base.dim() >= 2 else -1
    same_rest = outputs.shape[0] == base.shape[0] and outputs.shape[2:] == base.shape[2:]
    assert extra > 0 and same_rest, f"outputs {tuple(outputs.shape)} do not extend the base's {tuple(base.shape)}"
    return outputs[:, extra:]
