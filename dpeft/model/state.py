"""PEFT-format state dicts of a model: adapter tensors from the store, trained base biases, and (as PEFT saves
them when an embedding layer is targeted) the base weights of adapted embedding layers."""

from __future__ import annotations

import re

import torch
from torch import nn

from dpeft.model.layer import AdaptedLayer
from dpeft.model.model_hooks import loaded_state, saved_state
from dpeft.model.prompt import prompt_saved_state, prompt_state_to_store
from dpeft.model.tuner import tuner_of
from dpeft.store import PEFT_PREFIX, SHARED_PREFIX
from dpeft.store.fsdp_view import full_value
from dpeft.store.holders import walk_modules

# transformers' input and output embedding names; PEFT saves their base weights when one is targeted.
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def _bias_keys(tuner, adapter_name: str) -> dict[str, nn.Parameter]:
    """Base-model biases that `bias='all'|'lora_only'` trains, under PEFT's saved names."""
    bias = getattr(tuner.peft_config[adapter_name], "bias", "none")
    if bias == "none":
        return {}
    out = {}
    if bias == "all":
        for name, param in tuner.model.named_parameters():
            if name.endswith("bias") and "modules_to_save" not in name and "original_module" not in name:
                out[PEFT_PREFIX + name] = param
    else:
        for name, layer in tuner.adapted_layers():
            if layer.handler.bias is not None:
                out[f"{PEFT_PREFIX}{name}.base_layer.bias"] = layer.handler.bias
    return out


def _embedding_targeted(config, model: nn.Module) -> bool:
    """PEFT's rule: an embedding layer name is among `target_modules` (or a module it matches, for a regex)."""
    targets = getattr(config, "target_modules", None)
    if not targets:
        return False
    if isinstance(targets, str):
        return any(
            re.fullmatch(targets, n) for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in EMBEDDING_LAYER_NAMES
        )
    return any(t == e or t.endswith(f".{e}") for t in targets for e in EMBEDDING_LAYER_NAMES)


def _embedding_keys(tuner, adapted_only: bool) -> dict[str, nn.Parameter]:
    """Base weights of the model's input/output embeddings under PEFT's saved names (transformers models only)."""
    model = tuner.model
    if not hasattr(model, "get_input_embeddings"):
        return {}
    layers = [model.get_input_embeddings()]
    if hasattr(model, "get_output_embeddings"):
        layers.append(model.get_output_embeddings())
    ids = {id(layer) for layer in layers if layer is not None}
    out = {}
    for name, module in walk_modules(model):  # named_modules() less the adapter holders
        if id(module) not in ids:
            continue
        if isinstance(module, AdaptedLayer):
            out[f"{PEFT_PREFIX}{name}.base_layer.weight"] = module.handler.weight_param
        elif not adapted_only and isinstance(getattr(module, "weight", None), torch.Tensor):
            out[f"{PEFT_PREFIX}{name}.weight"] = module.weight
    return out


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: dict | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, torch.Tensor]:
    """The tensors `save_pretrained` writes for `adapter_name`, under HF PEFT's key names.

    Args:
        save_embedding_layers: Also save the base weights of the embedding layers: True, False, or "auto" (when
            an embedding layer is targeted, as PEFT does; PEFT's "auto" also checks the Hub config for a resized
            vocabulary, which dpeft cannot reach).
    """
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    tuner = tuner_of(model)
    out = tuner.store.state_dict(adapter_name)
    if adapter_name in getattr(tuner, "prompt_encoders", {}):
        out = prompt_saved_state(tuner, adapter_name, out)  # PEFT saves a prompt encoder's output
    # Base tensors may be FSDP2 shards (DTensors): full_value gathers them (every rank calls this then).
    out.update({k: full_value(p) for k, p in _bias_keys(tuner, adapter_name).items()})
    targeted = _embedding_targeted(tuner.peft_config[adapter_name], tuner.model)
    if save_embedding_layers is True or (save_embedding_layers == "auto" and targeted):
        out.update({k: full_value(p) for k, p in _embedding_keys(tuner, adapted_only=targeted).items()})
    if state_dict is not None:
        # A caller-provided state dict (e.g. gathered by an engine) overrides the values, key by key.
        out.update({k: state_dict[k] for k in out if k in state_dict})
    # The method's own saving rules (e.g. AdaLoRA drops the triplets its rank pattern pruned), as PEFT applies them.
    out = saved_state(tuner.peft_config[adapter_name], adapter_name, out)
    return out


_LEGACY = [
    (re.compile(r"\.modules_to_save\.(?=[^.]+$)"), "."),  # older PEFT: head.modules_to_save.weight
]


def normalize_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map key spellings of older PEFT versions onto the current ones."""
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in _LEGACY:
            key = pattern.sub(repl, key)
        if not key.startswith(PEFT_PREFIX) and not key.startswith(SHARED_PREFIX):  # shared: base_model.<name>
            key = PEFT_PREFIX + key
        out[key] = value
    return out


def _without_weight_suffix(key: str, expected: set[str]) -> str:
    stem = key.removesuffix(".weight")
    return stem if key not in expected and stem != key and stem in expected else key


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
    *,
    strict: bool = True,
    assign: bool = False,
) -> None:
    """Load PEFT-format tensors into `adapter_name`; every key and shape is checked before anything changes.

    Raises:
        ValueError: naming missing, unexpected or mis-shaped keys; the model is left unchanged.
    """
    tuner = tuner_of(model)
    if adapter_name in getattr(tuner, "prompt_encoders", {}):
        peft_model_state_dict = prompt_state_to_store(tuner, adapter_name, peft_model_state_dict)
    state = normalize_keys(peft_model_state_dict)
    state = loaded_state(tuner.peft_config[adapter_name], adapter_name, state)  # the method's saving rules, undone
    # Base tensors a PEFT checkpoint may carry besides the adapter's own: trained biases, embedding weights.
    biases = {**_embedding_keys(tuner, adapted_only=False), **_bias_keys(tuner, adapter_name)}
    expected = set(tuner.store.keys(adapter_name)) | set(biases)
    # Older PEFT saved some vectors as a module's `.weight` (e.g. a magnitude vector, now a plain parameter):
    # a key that fits only without that suffix is that tensor.
    state = {_without_weight_suffix(k, expected): v for k, v in state.items()}
    bias_part = {k: v for k, v in state.items() if k in biases}
    adapter_part = {k: v for k, v in state.items() if k not in biases}
    for key, value in bias_part.items():
        if tuple(value.shape) != tuple(biases[key].shape):
            raise ValueError(f"{key}: checkpoint shape {tuple(value.shape)} != model shape {tuple(biases[key].shape)}")
    tuner.store.load_state_dict(adapter_name, adapter_part, strict=strict, assign=assign)
    with torch.no_grad():
        for key, value in bias_part.items():
            biases[key].copy_(value)
