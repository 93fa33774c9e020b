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
    """`generate` of a decoder-only model with the active prompt adapter (`task_ids` for multitask prompts)."""
    tuner = peft_model._tuner
    name = peft_model.active_adapter
    task_ids = kwargs.pop("task_ids", None)

    def prepare(original, *a, **k):
        return _causal_prepare(tuner, name, original(*a, **k), task_ids)

    with patched_prepare(tuner.model, prepare):
        return tuner.model.generate(*args, **kwargs)


def _cache_key(inputs: dict) -> str:
    """Where the model inputs carry the cache: ``cache`` (transformers >= 5.x) or ``past_key_values`` (older)."""
    return "cache" if "cache" in inputs else KV


def _is_empty(cache: Any) -> bool:
    return cache is None or not cache.get_seq_length()


def _causal_prepare(tuner: nn.Module, name: str, inputs: dict, task_ids: torch.Tensor | None) -> dict:
    """PEFT's `prepare_inputs_for_generation` logic for prompt learning on decoder-only models: at the first step
    the prompt enters (embeddings in front of the input's, or the key/value prefix as the cache); every step the
    attention mask covers the virtual tokens and positions count them."""
    config = tuner.peft_config[name]
    kv = tuner.prompt_encoders[name][0].produces == KV
    n = config.num_virtual_tokens
    key = _cache_key(inputs)
    first = _is_empty(inputs.get(key))
    if not first and inputs["input_ids"].shape[1] > 1:
        inputs["input_ids"] = inputs["input_ids"][:, -1:]  # the cache holds the rest (and the virtual tokens)
    mask = inputs.get("attention_mask")
    if isinstance(mask, dict):
        if len(mask) != 1:
            raise ValueError(f"expected one attention mask in generation, got {len(mask)}")
        mask = next(iter(mask.values()))
    if mask is not None:
        if mask.dim() != 2:
            raise ValueError("prompt learning supports 2-D attention masks in generate; got a 4-D mask")
        inputs["attention_mask"] = pad_front(mask, inputs["input_ids"].shape[0], n, 1)
    if kv:
        adjust_ids(config, kv, inputs, keep_token_types=False)  # positions move past the prefix
    else:
        # generate's positions do not count the prompt embeddings: the model derives them from the cache.
        inputs.pop("position_ids", None)
        inputs.pop("cache_position", None)
    if first and kv:
        inputs[key] = get_prompt(tuner, name, inputs["input_ids"].shape[0])
    elif first:
        embeds = word_embeddings_of(tuner.model)(inputs["input_ids"])
        prompts = get_prompt(tuner, name, embeds.shape[0], task_ids).to(embeds.dtype)
        inputs["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)
        inputs["input_ids"] = None
    if first and kv and inputs.get("cache_position") is not None:
        inputs["cache_position"] = inputs["cache_position"] + n  # the prefix already fills the first positions
    return inputs


def seq2seq_generate(peft_model: nn.Module, kwargs: dict) -> Any:
    """`generate` of an encoder-decoder model: prompt embeddings go in front of the encoder's input embeddings;
    key/value prefixes are the decoder's cache at the first step."""
    tuner = peft_model._tuner
    name = peft_model.active_adapter
    config = tuner.peft_config[name]
    if "input_ids" not in kwargs:
        raise ValueError("generate with a prompt-learning adapter needs input_ids (as in HF PEFT)")
    adjust_ids(config, False, kwargs, keep_token_types=False)
    if tuner.prompt_encoders[name][0].produces == KV:
        from transformers import Cache

        def prepare(original, *a, **k):
            inputs = original(*a, **k)
            key = _cache_key(inputs)
            first = k.get("is_first_iteration")
            if first is None:
                first = _is_empty(inputs.get(key) if isinstance(inputs.get(key), Cache) else None)
            if first:
                inputs[key] = get_prompt(tuner, name, inputs["decoder_input_ids"].shape[0])
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
