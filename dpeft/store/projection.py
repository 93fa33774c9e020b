"""Projections of stored tensors before each read (`ParamSpec.project`), for methods whose PEFT layers rewrite
their own parameter in place inside forward (e.g. to keep a rotation close to the identity).

PEFT copies the projected value into the parameter under ``torch.no_grad`` and then computes with it, so the
optimizer steps from the projected value and the gradient is that of the projected value. The store does the same
through its own `write` (each rank keeps its part of the full value, so the sharded backend needs nothing more) and
hands out ``value + (projected - value)``: the projected value, with gradients passed through unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def refuse_projected(entries: Iterable[Any], backend: str) -> None:
    """Raise, before a backend that cannot write reads back (fsdp2, deepspeed) takes over, if an entry is projected."""
    for entry in entries:
        if entry.projected:
            names = [n for n, s in entry.specs.items() if s.project is not None]
            raise ValueError(
                f"adapter {entry.adapter!r} on {entry.module_name or 'the model'}: tensors {names} are projected in "
                f"place before each use (a constraint of the method), which the {backend} store backend does not "
                "support; use the local or sharded backend, or turn the constraint off in the adapter config"
            )


def project_reads(store: Any, entry: Any, own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`own` (the tensors `store.get` read for `entry`) with each projected tensor projected and written back."""
    if store._fsdp is not None or store._deepspeed is not None:  # wrapping refuses this first; kept as a backstop
        refuse_projected([entry], "fsdp2" if store._fsdp is not None else "deepspeed")
    out = dict(own)
    for name, spec in entry.specs.items():
        if spec.project is None:
            continue
        value = own[name]
        with torch.no_grad():
            detached = value.detach()
            projected = spec.project(detached)
            if projected is not detached:  # `project` returns its input itself when nothing moves
                store.write(entry, name, projected)  # the same decision on every rank: all hold the same full value
        # Locally `value` is the parameter itself and now holds `projected` (the shift is zero); under the sharded
        # backend it is the gathered copy of the old value. Either way the result reads `projected`.
        out[name] = value + (projected - value.detach())
    return out
