"""Per-call keyword arguments that methods read in their layers (e.g. ``task_ids``), with no method named here.

A method lists them at registration (``register_method(..., forward_kwargs=("task_ids",))``). While an adapter of
such a method is loaded, `PeftModel.forward` / `generate` (and `AdapterModel.forward`) take those names out of the
call, so the base model never sees them, and keep them in the model's `ForwardContext` for the duration of the call;
`AdaptedLayer` hands them to the method's `forward` (PEFT does this per method with forward pre-hooks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from dpeft.methods import get_method


def consumed_kwargs(peft_config: dict) -> set[str]:
    """The forward keyword arguments that the methods of the loaded adapters read."""
    return {name for config in peft_config.values() for name in get_method(config.peft_type).forward_kwargs}


@contextlib.contextmanager
def forward_extras(tuner: Any, kwargs: dict[str, Any]) -> Iterator[None]:
    """Move the keyword arguments the loaded methods read from `kwargs` (in place) into ``tuner.ctx.extras``.

    Args:
        tuner: The `AdapterModel` (its ``peft_config`` and ``ctx``).
        kwargs: The keyword arguments of the model call; the consumed names are popped from it.
    """
    names = consumed_kwargs(tuner.peft_config)
    if not names:
        yield
        return
    taken = {name: kwargs.pop(name) for name in names if name in kwargs}
    ctx = tuner.ctx
    previous, ctx.extras = ctx.extras, taken
    try:
        yield
    finally:
        ctx.extras = previous
