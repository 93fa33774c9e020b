"""`prepare_model_for_kbit_training`: get a k-bit quantized model ready for adapter training, as PEFT does."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from dpeft.quant.bnb import is_bnb_layer


def _is_kbit(model: nn.Module) -> bool:
    """Whether `model` holds k-bit quantized layers (transformers' flags, or bnb layers found in the model)."""
    if getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False):
        return True
    if getattr(model, "quantization_method", None) is not None or getattr(model, "hf_quantizer", None) is not None:
        return True
    return any(is_bnb_layer(m) for m in model.modules())


def _make_inputs_require_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
    output.requires_grad_(True)


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Freeze the base, upcast its float16/bfloat16 parameters to float32 and set up gradient checkpointing.

    Same steps as PEFT's function of this name: every parameter is frozen; non-quantized half-precision
    parameters (layer norms, embeddings, the head) become float32 so their math is stable in training; and, for a
    k-bit model with `use_gradient_checkpointing`, gradient checkpointing is enabled. With reentrant checkpointing
    (the default unless ``use_reentrant=False`` is passed) the input embeddings' output is made to require grad,
    because a reentrant checkpoint whose inputs need no grad would give the adapters inside it no gradients.

    Differs from PEFT on one point: PEFT detects a k-bit model by transformers' ``is_loaded_in_4bit/8bit`` flags,
    which transformers 5 no longer sets; dpeft also looks for the quantizer and for bitsandbytes layers.

    Args:
        model: A transformers model (or any module; gradient checkpointing needs transformers'
            ``gradient_checkpointing_enable``).
        use_gradient_checkpointing: Enable gradient checkpointing to trade compute for activation memory.
        gradient_checkpointing_kwargs: Passed to ``gradient_checkpointing_enable`` (e.g. ``{"use_reentrant": False}``).

    Returns:
        The same model, prepared in place.
    """
    # PEFT (on transformers 4) checkpoints reentrantly unless told otherwise; torch now wants the choice explicit.
    kwargs = {"use_reentrant": True, **(gradient_checkpointing_kwargs or {})}
    for param in model.parameters():
        param.requires_grad_(False)
    for param in model.parameters():
        # Quantized 4-bit weights may be stored as half-precision bytes (quant_storage); they must stay as they are.
        if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
            param.data = param.data.to(torch.float32)
    if not (use_gradient_checkpointing and _is_kbit(model)):
        return model
    if kwargs["use_reentrant"]:
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        else:
            model.get_input_embeddings().register_forward_hook(_make_inputs_require_grad)
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns there)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        return model
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if enable is None:
        raise ValueError(
            f"{type(model).__name__} has no gradient_checkpointing_enable(); pass use_gradient_checkpointing=False "
            "or use a transformers model"
        )
    if "gradient_checkpointing_kwargs" in inspect.signature(enable).parameters:
        enable(gradient_checkpointing_kwargs=kwargs)
    else:
        enable()
    return model
