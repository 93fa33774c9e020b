"""How the tuner uses the methods' model-level hooks (`dpeft.methods.hooks.ModelHooks`); no method is named here."""

from __future__ import annotations

from typing import Any

import torch

from dpeft.config import PeftConfig
from dpeft.methods import get_method
from dpeft.methods.hooks import ModelHooks


def check_new_adapter(peft_config: dict[str, PeftConfig], config: PeftConfig) -> None:
    """Let the method of `config` refuse the adapter set `peft_config` (which already holds the new adapter)."""
    hooks_cls = get_method(config.peft_type).model_hooks
    if hooks_cls is not None:
        same = {n: c for n, c in peft_config.items() if c.peft_type == config.peft_type}
        hooks_cls.check_adapters(same)


def make_hooks(tuner: Any, adapter_name: str, config: PeftConfig) -> ModelHooks | None:
    hooks_cls = get_method(config.peft_type).model_hooks
    return None if hooks_cls is None else hooks_cls(tuner, adapter_name, config)


def exported(hooks: dict[str, ModelHooks], name: str):
    """The model method `name` that a loaded adapter's hooks export (the adapter that serves them first), or None."""
    found = [h for h in hooks.values() if name in h.exports]
    if not found:
        return None
    serving = [h for h in found if h.serves_exports] or found
    return getattr(serving[0], name)


def add_extra_losses(outputs: Any, hooks: dict[str, ModelHooks]) -> Any:
    """Add every adapter's extra loss term to ``outputs.loss`` where the forward computed a loss tensor."""
    if not hooks:
        return outputs
    loss = getattr(outputs, "loss", None)
    if not isinstance(loss, torch.Tensor):
        return outputs
    extra = extra_loss(hooks)
    if extra is not None:
        outputs.loss = loss + extra  # transformers' ModelOutput keeps the attribute and the mapping entry in step
    return outputs


def extra_loss(hooks: dict[str, ModelHooks]) -> torch.Tensor | None:
    """The sum of every adapter's extra loss term (for loops that compute the loss themselves), or None."""
    total = None
    for h in hooks.values():
        extra = h.extra_loss()
        if extra is not None:
            total = extra if total is None else total + extra
    return total


def after_optimizer_step(hooks: dict[str, ModelHooks], global_step: int) -> None:
    """Run every adapter's per-step update after optimizer step `global_step`, before gradients are zeroed."""
    for h in hooks.values():
        h.after_optimizer_step(global_step)


def saved_state(config: PeftConfig, adapter_name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` as the method writes it in PEFT's format (unchanged for methods without hooks)."""
    hooks_cls = get_method(config.peft_type).model_hooks
    return state if hooks_cls is None else hooks_cls.saved_state(config, adapter_name, state)


def loaded_state(config: PeftConfig, adapter_name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT-format tensors as read -> what the method's store entries hold (unchanged for methods without hooks)."""
    hooks_cls = get_method(config.peft_type).model_hooks
    return state if hooks_cls is None else hooks_cls.loaded_state(config, adapter_name, state)
