"""Merging adapters onto a quantized base: the two policies and the record of which one was used.

- ``"requantize"`` (default, PEFT's behaviour): the merged float weight is quantized back into the bnb layer.
  The model stays small, but the merged weight is rounded to the quantization grid, so outputs drift from the
  unmerged adapter's by about one quantization step.
- ``"dequantize"``: each quantized layer is replaced by a float `nn.Linear` holding its dequantized weight (with
  the adapter merged in where one sits), so the merged model equals the adapted one up to float rounding.

The choice is recorded as ``dpeft_quantized_merge`` = ``{"policy": ..., "base_quantization": {...}}`` on the
model's `config` (a transformers config writes it into ``config.json`` on `save_pretrained`), or as an attribute
of that name on models without a config.
"""

from __future__ import annotations

from torch import nn

from dpeft.quant.bnb import is_bnb_layer, quantized_handler

QUANTIZED_MERGE_POLICIES = ("requantize", "dequantize")
RECORD_KEY = "dpeft_quantized_merge"


def check_quantized_merge(policy: str) -> None:
    """Raise a `ValueError` for an unknown merge policy."""
    if policy not in QUANTIZED_MERGE_POLICIES:
        raise ValueError(f"quantized_merge={policy!r} is not a merge policy; choose one of {QUANTIZED_MERGE_POLICIES}")


def base_quantization(model: nn.Module) -> dict[str, object] | None:
    """How `model`'s bnb-quantized base is quantized (None if it has no bnb layer).

    Its transformers `quantization_config` when it has one, else the settings of its first bnb layer.
    """
    first = next((m for m in model.modules() if is_bnb_layer(m)), None)
    if first is None:
        return None
    qconfig = getattr(getattr(model, "config", None), "quantization_config", None)
    if qconfig is not None:
        return qconfig.to_dict() if hasattr(qconfig, "to_dict") else dict(qconfig)
    return quantized_handler(first).quantization()


def dequantize_model(model: nn.Module) -> int:
    """Replace every bitsandbytes linear layer of `model` by a float `nn.Linear`; returns how many were replaced."""
    count = 0
    for name, module in list(model.named_modules()):
        if not name or not is_bnb_layer(module):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, quantized_handler(module).to_float_module())
        count += 1
    return count


def record_quantized_merge(model: nn.Module, policy: str, quantization: dict[str, object]) -> None:
    """Write the merge record; for "dequantize", also drop the quantization markers transformers saves and checks."""
    record = {"policy": policy, "base_quantization": quantization}
    config = getattr(model, "config", None)
    if config is None:
        setattr(model, RECORD_KEY, record)
        return
    setattr(config, RECORD_KEY, record)
    if policy == "dequantize":
        # The same markers transformers' own `dequantize()` removes, so the saved model loads as a float model.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        for attr in ("hf_quantizer", "quantization_method"):
            if attr in model.__dict__:
                delattr(model, attr)
        if hasattr(model, "is_quantized"):
            model.is_quantized = False
