"""`generate` for prompt-learning adapters: the base model's `prepare_inputs_for_generation` is patched for one
call so that the prompt (embeddings or a key/value cache) enters at the first step only, as in HF PEFT."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from dpeft.model.prompt import KV, adjust_ids, get_prompt, pad_front, word_embeddings_of


@contextlib.contextmanager
def patched_prepare(model: nn.Module, prepare: Callable[..., dict]) -> Iterator[None]:
    """Replace `model.prepare_inputs_for_generation` by ``prepare(original, ...)`` for one `generate` call."""
    had_own = "prepare_inputs_for_generation" in model.__dict__
    original = model.prepare_inputs_for_generation

    def prepare_inputs_for_generation(*args, **kwargs):  # named **kwargs: generate inspects this signature
        return prepare(original, *args, **kwargs)

    model.prepare_inputs_for_generation = prepare_inputs_for_generation
    try:
        yield
    finally:
        if had_own:
            model.prepare_inputs_for_generation = original
        else:
            del model.prepare_inputs_for_generation


def causal_generate(peft_model: nn.Module, args: tuple, kwargs: dict) -> Any:
    tuner = peft_model.base_model
    name = peft_model.active_adapter
    task_ids = kwargs.pop("task_ids", None)

    def prepare(original, *a, **k):
        return _causal_prepare(tuner, name, original(*a, **k), task_ids)

    with patched_prepare(tuner.model, prepare):
        return tuner.model.generate(*args, **kwargs)


def _causal_prepare(tuner: nn.Module, name: str, inputs: dict, task_ids: torch.Tensor | None) -> dict:
    """PEFT's `prepare_inputs_for_generation` for prompt learning on decoder-only models."""
    from transformers import Cache

    config = tuner.peft_config[name]
    kv = tuner.prompt_encoders[name][0].produces == KV
    n = config.num_virtual_tokens
    position = inputs.get("cache_position")
    prefill = position is not None and position[0] == 0
    cache = inputs.get(KV)
    if cache is not None:
        # The cache is longer than the ids by the virtual tokens: after the first step only the last id is new.
        seen = cache.get_seq_length() if isinstance(cache, Cache) else cache[0][0].shape[-2]
        if seen >= inputs["input_ids"].shape[1]:
            inputs["input_ids"] = inputs["input_ids"][:, -1:]
    mask = inputs.get("attention_mask")
    if isinstance(mask, dict):
        if len(mask) != 1:
            raise ValueError(f"expected one attention mask in generation, got {len(mask)}")
        mask = next(iter(mask.values()))
    if mask is not None:
        if mask.dim() != 2:
            raise ValueError("prompt learning supports 2-D attention masks in generate; got a 4-D mask")
        batch = inputs["input_ids"].shape[0]
        inputs["attention_mask"] = pad_front(mask, batch, n, 1)
    adjust_ids(config, kv, inputs, keep_token_types=False)
    fresh = cache is None or (isinstance(cache, Cache) and not cache.get_seq_length())
    if fresh and kv:
        inputs[KV] = get_prompt(tuner, name, inputs["input_ids"].shape[0])
    elif fresh:
        embeds = word_embeddings_of(tuner.model)(inputs["input_ids"])
        prompts = get_prompt(tuner, name, embeds.shape[0], task_ids).to(embeds.dtype)
        inputs["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)
        inputs["input_ids"] = None
    if prefill and kv:
        inputs["cache_position"] = inputs["cache_position"] + n  # the prefix already fills the first positions
    elif not kv:
        inputs.pop("cache_position", None)  # the model derives positions from the longer inputs_embeds
    return inputs


def seq2seq_generate(peft_model: nn.Module, kwargs: dict) -> Any:
    tuner = peft_model.base_model
    name = peft_model.active_adapter
    config = tuner.peft_config[name]
    if "input_ids" not in kwargs:
        raise ValueError("generate with a prompt-learning adapter needs input_ids (as in HF PEFT)")
    adjust_ids(config, False, kwargs, keep_token_types=False)
    if tuner.prompt_encoders[name][0].produces == KV:

        def prepare(original, *a, **k):
            inputs = original(*a, **k)
            first = k.get("is_first_iteration")
            if first is None:
                cache = inputs.get(KV)
                first = cache is None or not cache.get_seq_length()
            if first:
                inputs[KV] = get_prompt(tuner, name, inputs["decoder_input_ids"].shape[0])
            return inputs

        with patched_prepare(tuner.model, prepare):
            return tuner.model.generate(**kwargs)
    kwargs = dict(kwargs)
    if kwargs.pop("encoder_outputs", None) is not None:
        warnings.warn("encoder_outputs is ignored by generate with prompt learning", stacklevel=3)
    input_ids = kwargs.pop("input_ids")
    embeds = word_embeddings_of(tuner.model)(input_ids)
    batch, n = embeds.shape[0], config.num_virtual_tokens
    prompts = get_prompt(tuner, name, batch, kwargs.pop("task_ids", None)).to(embeds.dtype)
    kwargs["inputs_embeds"] = torch.cat([prompts[:, :n], embeds], dim=1)
    if kwargs.get("attention_mask") is not None:
        mask = kwargs["attention_mask"]
        kwargs["attention_mask"] = pad_front(mask, batch, n, 1)
    return tuner.model.generate(**kwargs)
