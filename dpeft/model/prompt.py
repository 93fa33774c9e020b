"""Virtual tokens for prompt-learning methods, written once for all of them (HF PEFT's forward paths).

A prompt-learning adapter adapts no layer: its method's `PromptEncoder` (see `dpeft.methods.prompt_base`) declares
its tensors to the store, registered at ``prompt_encoder.<adapter>`` of the tuner's `prompt_root` (the `PeftModel`,
whose ``base_model`` is then the user's model itself: HF PEFT's module paths), and produces either embeddings, which
are prepended to the input embeddings (attention mask extended, labels padded with -100), or per-layer key/value
prefixes, which reach the model as a transformers cache (`DynamicCache`, or `EncoderDecoderCache` for
encoder-decoder models). Generation patches the base model's `prepare_inputs_for_generation` for the duration of
one `generate` call so that the prompt enters at the first step only.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
from torch import nn

from dpeft.config import PeftConfig
from dpeft.store import PEFT_PREFIX, detach_holders

#: Where the encoders' tensors hang under the tuner's `prompt_root`, and the store's module name for them.
PROMPT_MODULE = "prompt_encoder"
KV = "past_key_values"


# ---------------------------------------------------------------------------------------------- adapters
def _model_config_value(model_config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(model_config, name, None)
        if value is not None:
            return value
    return None


def fill_from_model(config: PeftConfig, model: nn.Module, produces: str) -> None:
    """Fill the config's None model fields from the base model's config, as PEFT does (and saves them)."""
    model_config = getattr(model, "config", None)
    if hasattr(model_config, "get_text_config"):
        model_config = model_config.get_text_config()
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if config.task_type == "SEQ_2_SEQ_LM" else 1
    fields = {
        "num_layers": ("num_hidden_layers", "num_layers", "n_layer"),
        "token_dim": ("hidden_size", "n_embd", "d_model"),
        "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
    }
    for field_name, names in fields.items():
        if getattr(config, field_name) is None:
            value = _model_config_value(model_config, *names)
            if value is None:
                raise ValueError(f"cannot read {field_name} off the base model's config; set it in the adapter config")
            setattr(config, field_name, value)
    kv_heads = _model_config_value(model_config, "num_key_value_heads")
    if produces == KV and kv_heads is not None:
        # Grouped-query attention: the prefix has the shape of the layers' keys and values, not of the queries.
        head_dim = _model_config_value(model_config, "head_dim") or config.token_dim // config.num_attention_heads
        config.token_dim, config.num_attention_heads = head_dim * kv_heads, kv_heads
    if hasattr(config, "encoder_hidden_size") and config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    if config.num_virtual_tokens is None:
        raise ValueError(f"{type(config).__name__} needs num_virtual_tokens (the number of virtual tokens)")


def check_combination(tuner: nn.Module, adapter_name: str, config: PeftConfig) -> None:
    """As in HF PEFT, a model with a prompt-learning adapter holds adapters of that one type only."""
    others = {c.peft_type for n, c in tuner.peft_config.items() if n != adapter_name}
    prompt = config.is_prompt_learning or any(c.is_prompt_learning for c in tuner.peft_config.values())
    if prompt and others - {config.peft_type}:
        raise ValueError(
            f"cannot add a {config.peft_type} adapter to a model with {sorted(others)} adapters: prompt-learning "
            "adapters cannot be combined with adapters of another type (as in HF PEFT)"
        )


def add_prompt_adapter(tuner: nn.Module, adapter_name: str, config: PeftConfig, method: Any, init: bool) -> None:
    """Build `adapter_name`'s encoder and declare its tensors to the store (PEFT's `_setup_prompt_encoder`)."""
    produces = getattr(method.make_encoder, "produces", "embeddings")
    fill_from_model(config, tuner.model, produces)
    if produces == KV and any(getattr(m, "gradient_checkpointing", False) for m in tuner.model.modules()):
        raise ValueError(f"{config.peft_type} does not work with gradient checkpointing; disable it first")
    word_embeddings = word_embeddings_of(tuner.model)
    if word_embeddings is None:
        raise ValueError(
            f"{config.peft_type} needs the base model's input embeddings (`get_input_embeddings()`), which "
            f"{type(tuner.model).__name__} does not provide; use a transformers model"
        )
    encoder = method.make_encoder(config)
    # float32 whatever the base dtype, as PEFT's encoder modules. Always initialised (a checkpoint holds only the
    # encoder's output; the rest keeps its init, as in PEFT); `after_allocation` (vocabulary or text init) is
    # skipped when a load follows.
    device = word_embeddings.weight.device
    root = tuner.prompt_root
    entry = tuner.store.declare(root, PROMPT_MODULE, adapter_name, encoder.specs, device=device, dtype=torch.float32)
    if init:
        encoder.after_allocation(entry.params, word_embeddings)
    tuner.prompt_encoders[adapter_name] = (encoder, entry)


def remove_prompt_adapter(tuner: nn.Module, adapter_name: str) -> None:
    if tuner.prompt_encoders.pop(adapter_name, None) is not None:
        detach_holders(tuner.prompt_root, adapter_name)


def word_embeddings_of(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    return get() if get is not None else None


def is_prompt_model(tuner: nn.Module) -> bool:
    return bool(getattr(tuner, "prompt_encoders", None))


def get_prompt(tuner: nn.Module, adapter_name: str, batch_size: int, task_ids: torch.Tensor | None = None):
    """The prompt of `adapter_name` for a batch: embeddings (batch, tokens, dim), or a cache for key/value methods."""
    encoder, entry = tuner.prompt_encoders[adapter_name]
    # The user's model follows `PeftModel.train()`/`eval()`; the tuner (unregistered for prompt models) may not.
    prompt = encoder.prompt(tuner.store.get(entry), batch_size, task_ids, training=tuner.model.training)
    if encoder.produces != KV:
        return prompt
    return _cache(encoder.config, prompt, getattr(tuner.model, "dtype", None))


def _cache(config: PeftConfig, kv: torch.Tensor, dtype: torch.dtype | None):
    """(batch, tokens, layers * 2 * dim) prefixes as the transformers cache the model's attention reads."""
    from transformers import DynamicCache, EncoderDecoderCache

    if dtype is not None:
        kv = kv.to(dtype)
    batch, tokens = kv.shape[:2]
    heads = config.num_attention_heads
    kv = kv.reshape(batch, tokens, config.num_layers * 2, heads, config.token_dim // heads)
    stacks = config.num_transformer_submodules
    if stacks == 2:
        kv = torch.cat([kv, kv], dim=2)
    layers = kv.permute(2, 0, 3, 1, 4).split(stacks * 2)  # per layer: (2 * stacks, batch, heads, tokens, head dim)
    if stacks == 1:
        return DynamicCache(layers)
    cache = EncoderDecoderCache(layers)
    # The encoder's outputs change with the input, so the cross-attention cache starts empty (as in PEFT).
    cache.cross_attention_cache = DynamicCache()
    for key in cache.is_updated:
        cache.is_updated[key] = False
    return cache


# ---------------------------------------------------------------------------------------------- forward
def _batch_size(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> int:
    if input_ids is None and inputs_embeds is None:
        raise ValueError("pass input_ids or inputs_embeds to a prompt-learning model")
    return (input_ids if input_ids is not None else inputs_embeds).shape[0]


def adjust_ids(config: PeftConfig, kv: bool, kwargs: dict, keep_token_types: bool) -> None:
    """Position ids shift past a key/value prefix and are dropped for prepended embeddings; token type ids are
    dropped where PEFT drops them (causal and seq2seq models)."""
    if kwargs.get("position_ids") is not None:
        if kv:
            kwargs["position_ids"] = kwargs["position_ids"] + config.num_virtual_tokens
        else:
            warnings.warn("position_ids are not supported with prompt learning; ignoring them", stacklevel=3)
            kwargs["position_ids"] = None
    if not keep_token_types and kwargs.get("token_type_ids") is not None:
        warnings.warn("token_type_ids are not supported with prompt learning; ignoring them", stacklevel=3)
        kwargs["token_type_ids"] = None


def pad_front(values: torch.Tensor, batch: int, tokens: int, fill: int) -> torch.Tensor:
    """`values` (batch, length) with `tokens` columns of `fill` in front."""
    return torch.cat([torch.full_like(values[:, :1], fill).expand(batch, tokens), values], dim=1)


def _masks_to_extend(task: str, kv: bool, decoder_prompt: bool) -> list[str]:
    """Which attention masks get the virtual tokens: the encoder's where embeddings are prepended to it, the
    decoder's where key/value prefixes or prompt embeddings reach the decoder (PEFT's rules)."""
    if task != "seq2seq":
        return ["attention_mask"]
    return (["decoder_attention_mask"] if kv or decoder_prompt else []) + ([] if kv else ["attention_mask"])


def prompt_forward(peft_model: nn.Module, task: str, kwargs: dict) -> Any:
    """The forward of a model whose active adapter is a prompt-learning one.

    Args:
        task: ``"causal"``, ``"seq2seq"``, ``"classification"`` (sequence/token classification, question
            answering) or ``"features"``.
    """
    tuner = peft_model._tuner
    name = peft_model.active_adapter
    config = tuner.peft_config[name]
    encoder = tuner.prompt_encoders[name][0]
    kv, decoder_prompt = encoder.produces == KV, encoder.decoder_prompt
    task_ids = kwargs.pop("task_ids", None)
    input_ids, inputs_embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
    batch, n = _batch_size(input_ids, inputs_embeds), config.num_virtual_tokens
    base = tuner.model
    for key in _masks_to_extend(task, kv, decoder_prompt):
        if kwargs.get(key) is not None:
            kwargs[key] = pad_front(kwargs[key], batch, n, 1)
    adjust_ids(config, kv, kwargs, keep_token_types=task == "classification")
    if kv:
        params = inspect.signature(base.forward).parameters
        # transformers 5.x names the argument `cache` (`past_key_values` still works there, with a warning).
        key = "cache" if "cache" in params else KV
        if task == "classification" and key not in params:
            raise ValueError(
                f"{type(base).__name__}.forward takes no past_key_values (or cache), which prefix tuning needs; use "
                "prompt tuning or P-tuning with this model"
            )
        kwargs[key] = get_prompt(tuner, name, batch)
        return base(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)
    if inputs_embeds is None:
        inputs_embeds = word_embeddings_of(base)(input_ids)
    if kwargs.get("token_type_ids") is not None:
        kwargs["token_type_ids"] = pad_front(kwargs["token_type_ids"], batch, n, 0)
    if task == "causal" and kwargs.get("labels") is not None:
        kwargs["labels"] = pad_front(kwargs["labels"], batch, n, -100)
    prompts = get_prompt(tuner, name, batch, task_ids).to(inputs_embeds.dtype)
    inputs_embeds = torch.cat([prompts[:, :n], inputs_embeds], dim=1)
    if task == "seq2seq" and decoder_prompt:
        return _decoder_prompt_forward(base, config, prompts, inputs_embeds, kwargs)
    # Otherwise an encoder-decoder model's prompt has a second half for the decoder, which goes unused (as in PEFT).
    return base(inputs_embeds=inputs_embeds, **kwargs)


def _decoder_prompt_forward(base: nn.Module, config: PeftConfig, prompts, inputs_embeds, kwargs: dict) -> Any:
    """PEFT's encoder-decoder path for prompts with a decoder half: that half is prepended to the decoder's input
    embeddings (made from the labels shifted right) and the labels are padded to match."""
    batch, n = inputs_embeds.shape[0], config.num_virtual_tokens
    decoder_ids = kwargs.pop("decoder_input_ids", None)
    decoder_embeds = kwargs.pop("decoder_inputs_embeds", None)
    labels = kwargs.get("labels")
    if decoder_embeds is None and decoder_ids is None:
        if labels is None:
            raise ValueError("pass labels, decoder_input_ids or decoder_inputs_embeds to an encoder-decoder model")
        decoder_ids = _shift_right(labels, base.config)
    if config.num_transformer_submodules == 1:  # no decoder half: the decoder inputs go through unchanged
        return base(
            inputs_embeds=inputs_embeds, decoder_input_ids=decoder_ids, decoder_inputs_embeds=decoder_embeds, **kwargs
        )
    if decoder_embeds is None:
        decoder_embeds = word_embeddings_of(base)(decoder_ids)
    if labels is not None:
        kwargs["labels"] = pad_front(labels, batch, n, -100)
    decoder_embeds = torch.cat([prompts[:, n:].to(decoder_embeds.dtype), decoder_embeds], dim=1)
    return base(inputs_embeds=inputs_embeds, decoder_inputs_embeds=decoder_embeds, **kwargs)


def _shift_right(labels: torch.Tensor, model_config: Any) -> torch.Tensor:
    """Decoder inputs from labels: the start token, then the labels but the last, with -100 read as padding."""
    shifted = torch.empty_like(labels)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = model_config.decoder_start_token_id
    return shifted.masked_fill(shifted == -100, model_config.pad_token_id)


# ---------------------------------------------------------------------------------------------- saved state
#: PEFT keeps a prompt-learning model's base model at ``base_model`` (no tuner in between), so heads in
#: `modules_to_save` are saved as ``base_model.<head>...`` instead of ``base_model.model.<head>...``.
HEAD_PREFIX = "base_model."


def prompt_saved_state(tuner: nn.Module, adapter_name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Store-keyed full tensors of a prompt adapter -> what PEFT saves: the encoder's output (`prompt_embeddings`)
    and the saved heads under PEFT's prompt-learning key names."""
    encoder, entry = tuner.prompt_encoders[adapter_name]
    return _saved(encoder, state, {name: entry.peft_key(name) for name in entry.specs})


def exported_prompt_state(config: PeftConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`prompt_saved_state` with no model, for `dpeft export`: `state` holds the store's tensors of an adapter
    with `config` (as saved, e.g. training-mode encoder weights) read from a distributed checkpoint."""
    from dpeft.methods import get_method

    encoder = get_method(config.peft_type).make_encoder(config)
    return _saved(encoder, state, {s.name: f"{PEFT_PREFIX}{PROMPT_MODULE}.{s.save_suffix}" for s in encoder.specs})


def _saved(encoder: Any, state: dict[str, torch.Tensor], keys: dict[str, str]) -> dict[str, torch.Tensor]:
    state = dict(state)
    own = {name: state.pop(key) for name, key in keys.items()}
    with torch.no_grad():
        out = encoder.saved_state(own)
    out.update({HEAD_PREFIX + k.removeprefix(PEFT_PREFIX): v for k, v in state.items()})
    return out


def prompt_state_to_store(tuner: nn.Module, adapter_name: str, state: dict[str, torch.Tensor]) -> dict:
    """The inverse of `prompt_saved_state`: PEFT-format tensors -> the store's keys for this adapter.

    Raises:
        ValueError: if the encoder cannot take the saved prompt (see its `load_state`) or a tensor has another shape.
    """
    encoder, entry = tuner.prompt_encoders[adapter_name]
    heads = {PEFT_PREFIX + k.removeprefix(HEAD_PREFIX): v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
    own = encoder.load_state({k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)})
    for name, value in own.items():
        want = tuple(entry.specs[name].shape)
        if tuple(value.shape) != want:
            raise ValueError(
                f"the checkpoint's prompt has shape {tuple(value.shape)} but this {encoder.config.peft_type} adapter "
                f"needs {want}; check num_virtual_tokens, token_dim and num_layers against the base model"
            )
    # Tensors the file does not hold (an encoder network PEFT never saves) keep their init, as in PEFT.
    kept = {name: entry.params[name].detach() for name in entry.specs if name not in own}
    return {**{entry.peft_key(name): value for name, value in {**kept, **own}.items()}, **heads}
