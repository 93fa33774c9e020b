"""`ModelHooks`: what a method adds at the level of the whole model, beyond its layers (most methods add nothing).

A method registers a `ModelHooks` subclass (``register_method(..., model_hooks=...)``); the tuner
(`dpeft.model.AdapterModel`) makes one instance per adapter of that method and calls it at fixed points:

- `check_adapters` before an adapter is added (e.g. AdaLoRA allows one trainable adapter),
- `extra_loss` after each forward whose output has a ``loss`` (added to it, e.g. AdaLoRA's orthogonal
  regularisation),
- `saved_state` on every PEFT-format state dict written (`save_pretrained`, `dpeft export`), e.g. to drop what the
  method's config says is pruned, and `loaded_state` on every one read (its inverse),
- the methods listed in `exports`, reachable as ``model.base_model.<name>`` and ``model.<name>`` (AdaLoRA's
  ``update_and_allocate``),
- in `dpeft.train.run`: `after_optimizer_step` after each optimizer step (before gradients are zeroed), and
  `train_state` / `load_train_state` for training state kept outside the store and the optimizer, saved in and
  restored from distributed checkpoints (AdaLoRA's importance averages); config fields that training changes are
  listed in `train_config_fields` and restored from the checkpoint too.

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
    #: Config fields that training rewrites (AdaLoRA's ``rank_pattern``): a checkpoint restores them instead of
    #: requiring the model's config to hold the saved values already.
    train_config_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, tuner: Any, adapter_name: str, config: PeftConfig) -> None:
        self.tuner = tuner
        self.adapter_name = adapter_name
        self.config = config

    @classmethod
    def check_adapters(cls, configs: dict[str, PeftConfig]) -> None:
        """Raise `ValueError` if the model may not hold these adapters of this method (the new one included)."""

    @classmethod
    def run_defaults(cls, steps: int) -> dict[str, Any]:
        """Config fields that a training run of `steps` optimizer steps fills where the adapter config leaves them
        unset (None or absent), e.g. AdaLoRA's ``total_step``."""
        return {}

    @property
    def adds_training_steps(self) -> bool:
        """Whether training needs this object's loss term or exported per-step calls (a loop that cannot run them
        must refuse the adapter rather than train it differently from PEFT)."""
        return bool(self.exports) or type(self).extra_loss is not ModelHooks.extra_loss

    @property
    def trains_in_loop(self) -> bool:
        """Whether `dpeft.train.run` runs everything training needs from this object: its extra loss, and its
        exported per-step calls through `after_optimizer_step` (a class that exports such calls overrides it)."""
        return not self.exports or type(self).after_optimizer_step is not ModelHooks.after_optimizer_step

    @property
    def serves_exports(self) -> bool:
        """Whether this adapter answers the exported methods when several adapters of the method are loaded."""
        return True

    def extra_loss(self) -> torch.Tensor | None:
        """A term added to the model output's ``loss`` after each forward that computed one; None for nothing."""
        return None

    def after_optimizer_step(self, global_step: int) -> None:
        """Called by the training loop after optimizer step `global_step` (0-based), while gradients still exist."""

    def train_state(self) -> dict[str, tuple[torch.nn.Parameter, torch.Tensor]]:
        """Training state kept outside the store and the optimizer: name -> (store parameter, tensor shaped and
        placed like that parameter as this rank holds it), so checkpoints save and reshard it like the parameter's
        optimizer state. The same names whatever the training progress (zeros where nothing is accumulated yet):
        a fresh model's `train_state` is the template a checkpoint is read into."""
        return {}

    def load_train_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Install `tensors` (the names of `train_state`, this rank's parts) read from a checkpoint."""

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
