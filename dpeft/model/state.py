"""PEFT-format state dicts of a model: adapter tensors from the store plus trained base biases."""

from __future__ import annotations

import re

import torch
from torch import nn

from dpeft.store import PEFT_PREFIX


def _tuner(model: nn.Module):
    base = getattr(model, "base_model", model)
    if not hasattr(base, "store"):
        raise TypeError(f"{type(model).__name__} has no dpeft adapters; build it with get_peft_model first")
    return base


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


def get_peft_model_state_dict(
    model: nn.Module, state_dict: dict | None = None, adapter_name: str = "default", **kwargs
) -> dict[str, torch.Tensor]:
    """The tensors `save_pretrained` writes for `adapter_name`, under HF PEFT's key names."""
    tuner = _tuner(model)
    out = tuner.store.state_dict(adapter_name)
    out.update({k: p.detach() for k, p in _bias_keys(tuner, adapter_name).items()})
    if state_dict is not None:
        # A caller-provided state dict (e.g. gathered by an engine) overrides the values, key by key.
        out.update({k: state_dict[k] for k in out if k in state_dict})
    return out


_LEGACY = [
    (re.compile(r"\.modules_to_save\.(?=[^.]+$)"), "."),  # older PEFT: head.modules_to_save.weight
    (re.compile(r"\.lora_magnitude_vector\.weight$"), ".lora_magnitude_vector"),
]


def normalize_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map key spellings of older PEFT versions onto the current ones."""
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in _LEGACY:
            key = pattern.sub(repl, key)
        if not key.startswith(PEFT_PREFIX):
            key = PEFT_PREFIX + key
        out[key] = value
    return out


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
    tuner = _tuner(model)
    state = normalize_keys(peft_model_state_dict)
    biases = _bias_keys(tuner, adapter_name)
    bias_part = {k: v for k, v in state.items() if k in biases}
    adapter_part = {k: v for k, v in state.items() if k not in biases}
    for key, value in bias_part.items():
        if tuple(value.shape) != tuple(biases[key].shape):
            raise ValueError(f"{key}: checkpoint shape {tuple(value.shape)} != model shape {tuple(biases[key].shape)}")
    tuner.store.load_state_dict(adapter_name, adapter_part, strict=strict, assign=assign)
    with torch.no_grad():
        for key, value in bias_part.items():
            biases[key].copy_(value)
