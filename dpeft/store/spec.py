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
    """

    name: str
    shape: tuple[int, ...]
    path: tuple[str, ...]
    init: Callable[[torch.Tensor], object] | None = None
    trainable: bool = True
    dtype: torch.dtype | None = None
    saved: str | None = None

    def __post_init__(self) -> None:
        assert ADAPTER in self.path, f"ParamSpec {self.name}: path {self.path} must contain ADAPTER"

    def module_path(self, adapter: str) -> tuple[str, ...]:
        return tuple(adapter if p == ADAPTER else p for p in self.path)

    @property
    def save_suffix(self) -> str:
        return self.saved or ".".join(p for p in self.path if p != ADAPTER)
