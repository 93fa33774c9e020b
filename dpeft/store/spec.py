"""What a method declares about each adapter tensor; the store turns declarations into tensors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

ADAPTER = "{adapter}"
"""Placeholder for the adapter name inside a `ParamSpec.path`; PEFT's saved keys drop that segment."""


@dataclass(frozen=True)
class ParamSpec:
    """One adapter tensor of one layer.

    Attributes:
        name: The method-local name the layer uses to ask for it, e.g. ``"lora_A"``.
        shape: Its logical (full, unsharded) shape.
        path: Where PEFT keeps it under the adapted module, with `ADAPTER` where the adapter name goes,
            e.g. ``("lora_A", ADAPTER, "weight")``. The saved key is the path without the adapter segment.
        init: Fills a freshly allocated tensor in place (under ``torch.no_grad``); ``None`` leaves zeros.
        trainable: Whether the optimizer updates it.
        dtype: Its dtype; ``None`` means float32 for float bases in half precision, else the base dtype.
        saved: The saved-key suffix when PEFT's differs from the path without the adapter segment.
        buffer: PEFT keeps it as a buffer (e.g. VeRA's frozen random projections): the store registers a frozen
            parameter, which `get_nb_trainable_parameters` leaves out of its counts as PEFT does.
        persistent: False for a tensor that is neither saved nor loaded (PEFT's non-persistent buffers); it is
            always initialised by `init`, also when a checkpoint load fills the other tensors.
        layer_copies: For a shared (model-level) tensor: PEFT also saves it under every layer that uses it
            (RandLoRA), so those keys are written and read too (one tensor; loading copies each key into it).
        attach: False for a saved tensor PEFT keeps outside the module tree (SHiRA's indices live in a plain dict):
            the store holds, saves, loads and shards it, but registers it under no module, so module paths and the
            model's `state_dict` keys stay PEFT's.
        project: Maps the stored value to the value every read sees, which is also written back (as PEFT's layers
            rewrite a parameter in place inside forward, e.g. to keep it in a ball); gradients pass through it
            unchanged (see `dpeft.store.projection`). Returns its input itself when nothing moves (then nothing is
            written). Supported by the local and sharded backends (fsdp2 and deepspeed refuse it before wrapping).
    """

    name: str
    shape: tuple[int, ...]
    path: tuple[str, ...]
    init: Callable[[torch.Tensor], object] | None = None
    trainable: bool = True
    dtype: torch.dtype | None = None
    saved: str | None = None
    buffer: bool = False
    persistent: bool = True
    layer_copies: bool = False
    attach: bool = True
    project: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        assert ADAPTER in self.path, f"ParamSpec {self.name}: path {self.path} must contain ADAPTER"

    def module_path(self, adapter: str) -> tuple[str, ...]:
        return tuple(adapter if p == ADAPTER else p for p in self.path)

    @property
    def save_suffix(self) -> str:
        return self.saved or ".".join(p for p in self.path if p != ADAPTER)
