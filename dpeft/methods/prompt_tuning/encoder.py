"""Prompt tuning's encoder: the virtual-token embeddings are the prompt."""

from __future__ import annotations

import math

import torch
from torch import nn

from dpeft.methods.prompt_base import PromptEncoder, embedding_spec
from dpeft.methods.prompt_tuning.config import PromptTuningConfig, PromptTuningInit


class PromptEmbedding(PromptEncoder):
    """A (virtual tokens x token_dim) embedding, N(0, 1) or copied from the base model's word embeddings."""

    def __init__(self, config: PromptTuningConfig) -> None:
        super().__init__(config)
        self.specs = [embedding_spec("embedding", self.total_virtual_tokens, config.token_dim)]

    def after_allocation(self, p: dict[str, torch.Tensor], word_embeddings: nn.Module | None) -> None:
        init = self.config.prompt_tuning_init
        if self.config.inference_mode or init == PromptTuningInit.RANDOM.value:
            return
        if word_embeddings is None:
            raise ValueError(f"prompt_tuning_init={init!r} needs the base model's word embeddings; none were found")
        if init == PromptTuningInit.SAMPLE_VOCAB.value:
            ids = torch.randint(0, word_embeddings.num_embeddings, (self.total_virtual_tokens,), dtype=torch.long)
        else:
            ids = torch.tensor(self._text_token_ids(), dtype=torch.long)
        with torch.no_grad():
            p["embedding"].copy_(word_embeddings(ids.to(word_embeddings.weight.device)).float())

    def _text_token_ids(self) -> list[int]:
        """The init text's token ids, cut or repeated to the number of virtual tokens (PEFT's rule)."""
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:  # pragma: no cover - transformers is a dependency of every model we adapt
            raise ValueError("prompt_tuning_init='TEXT' needs transformers for the tokenizer") from exc

        kwargs = dict(self.config.tokenizer_kwargs or {})
        kwargs.pop("trust_remote_code", None)  # a checkpoint's config must not run code
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.config.tokenizer_name_or_path, **kwargs)
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"cannot load tokenizer {self.config.tokenizer_name_or_path!r} for prompt_tuning_init='TEXT': {exc}. "
                "Pass a local tokenizer directory, or use prompt_tuning_init='RANDOM' or 'SAMPLE_VOCAB'."
            ) from exc
        ids = tokenizer(self.config.prompt_tuning_init_text)["input_ids"]
        if not ids:
            raise ValueError("prompt_tuning_init_text tokenizes to no tokens; give a non-empty text")
        total = self.total_virtual_tokens
        return (ids * math.ceil(total / len(ids)))[:total]
