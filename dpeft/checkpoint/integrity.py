"""Integrity checks on the checkpoint side: before a distributed checkpoint is written, and after one is read.

The tensor checks themselves live in `dpeft.store.integrity` (the store's `state_dict` runs them on every full
state it hands out, which covers `save_pretrained` and merging). Here they are applied to distributed checkpoints:

- `check_before_save`: every adapter tensor of the store has its logical shape and is finite; returns each one's
  sum of squares, which the manifest records (``tensors.<key>.sq_norm``);
- `check_read_back`: tensors read back from a checkpoint (`load_checkpoint`, `dpeft export`) have the manifest's
  shapes, are finite, and have the sums of squares recorded at save time, so a read that came back empty, zeroed
  or from the wrong rows stops before anything uses or publishes it.
"""

from __future__ import annotations

from typing import Any

import torch

from dpeft.store.integrity import AdapterIntegrityError, verify_read_back, verify_sharded_state


def logical_shapes(store) -> dict[str, tuple[int, ...]]:
    """checkpoint key (``adapter/<name>/<PEFT key>``) -> logical shape its `ParamSpec` declares."""
    return {key: tuple(shape) for key, shape, _ in store.param_keys().values()}


def check_before_save(store, state: dict[str, torch.Tensor]) -> dict[str, float]:
    """Check the adapter tensors of `state` (from ``store.sharded_state_dict()``) before a checkpoint is written.

    Every rank calls this (sums over shards are all-reduced), so every rank raises together.

    Returns:
        checkpoint key -> sum of squares of the full tensor.

    Raises:
        AdapterIntegrityError: naming each tensor at fault; nothing has been written then.
    """
    return verify_sharded_state(state, logical_shapes(store))


def check_read_back(path: str, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
    """Check adapter tensors read from checkpoint `path` against what its manifest recorded at save time.

    Raises:
        AdapterIntegrityError: naming each tensor at fault.
    """
    saved = manifest["tensors"]
    verify_read_back(f"checkpoint {path!r}", {k: t for k, t in tensors.items() if k in saved}, saved)


__all__ = ["AdapterIntegrityError", "check_before_save", "check_read_back", "logical_shapes"]
