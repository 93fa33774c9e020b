"""`ModelHooks`: what a method adds at the level of the whole model, beyond its layers (most methods add nothing).

A method registers a `ModelHooks` subclass (``register_method(..., model_hooks=...)``); the tuner
(`dpeft.model.AdapterModel`) makes one instance per adapter of that method and calls it at fixed points:

- `check_adapters` before an adapter is added (e.g. AdaLoRA allows one trainable adapter),
- `extra_loss` after each forward whose output has a ``loss`` (added to it, e.g. AdaLoRA's orthogonal
  regularisation),
- `saved_state` on every PEFT-format state dict written (`save_pretrained`, `dpeft export`), e.g. to drop what the
  method's config says is pruned, and `loaded_state` on every one read (its inverse),
- the methods listed in `exports`, reachable as ``model.base_model.<name>`` and ``model.<name>`` (AdaLoRA's
  ``update_and_allocate``).

Hooks see the tuner only through its public surface (`peft_config`, `store`, `adapted_layers()`), so they stay
free of distribution code: the store's `gather` / `write` / `get` work the same under every backend.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from dpeft.config import PeftConfig


class ModelHooks:
    """Model-level behaviour of one adapter of one method.

    Args:
        tuner: The `AdapterModel` holding the adapter.
        adapter_name: The adapter's name.
        config: The adapter's config (the tuner's own copy: changes show in what `save_pretrained` writes).
    """

    #: Names of methods of this class that the model exposes (``model.base_model.<name>``).
    exports: ClassVar[tuple[str, ...]] = ()

    def __init__(self, tuner: Any, adapter_name: str, config: PeftConfig) -> None:
        self.tuner = tuner
        self.adapter_name = adapter_name
        self.config = config

    @classmethod
    def check_adapters(cls, configs: dict[str, PeftConfig]) -> None:
        """Raise `ValueError` if the model may not hold these adapters of this method (the new one included)."""

    @property
    def adds_training_steps(self) -> bool:
        """Whether training needs this object's loss term or exported per-step calls (a loop that cannot run them
        must refuse the adapter rather than train it differently from PEFT)."""
        return bool(self.exports) or type(self).extra_loss is not ModelHooks.extra_loss

    @property
    def serves_exports(self) -> bool:
        """Whether this adapter answers the exported methods when several adapters of the method are loaded."""
        return True

    def extra_loss(self) -> torch.Tensor | None:
        """A term added to the model output's ``loss`` after each forward that computed one; None for nothing."""
        return None

    @staticmethod
    def saved_state(config: PeftConfig, adapter_name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The PEFT-format tensors (``base_model.model.`` keys) to write for an adapter with `config`.

        Static: `dpeft export` applies it to tensors read from a distributed checkpoint, with no model.
        """
        return state

    @staticmethod
    def loaded_state(config: PeftConfig, adapter_name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inverse of `saved_state`: PEFT-format tensors as read (``base_model.model.`` keys) -> the store's keys
        and tensors (e.g. VB-LoRA rebuilds logits from saved top-k indices and weights). Called before any check."""
        return state
