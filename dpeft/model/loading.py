"""Checkpoint-loading helpers of `PeftModel.from_pretrained` / `load_adapter`: key renaming (PEFT's
`key_mapping` and transformers' checkpoint conversion mappings) and trainability snapshots for rollback."""

from __future__ import annotations

import re

import torch
from torch import nn

from dpeft.store.holders import walk_parameters


def trainability(model: nn.Module) -> list[tuple[nn.Parameter, bool]]:
    """Each parameter of `model` with its `requires_grad`, for `restore` after a failed load."""
    return [(p, p.requires_grad) for p in walk_parameters(model)]  # parameters(), without its named walk


def restore(trainability: list[tuple[nn.Parameter, bool]]) -> None:
    """Set back the `requires_grad` flags `trainability` recorded."""
    for param, requires_grad in trainability:
        param.requires_grad_(requires_grad)


def conversion_mapping(model: nn.Module) -> dict[str, str]:
    """The model's own key renames (transformers' `_checkpoint_conversion_mapping`), PEFT's default `key_mapping`."""
    return dict(getattr(model, "_checkpoint_conversion_mapping", None) or {})


def remap_keys(state: dict[str, torch.Tensor], key_mapping: dict[str, str]) -> dict[str, torch.Tensor]:
    """Rename checkpoint keys with regex -> replacement rules (first rule that matches wins), prefix kept aside."""
    if not key_mapping:
        return state
    out = {}
    for key, value in state.items():
        prefix = next((p for p in ("base_model.model.", "base_model.") if key.startswith(p)), "")
        body = key[len(prefix) :]
        for pattern, replacement in key_mapping.items():
            body, count = re.subn(pattern, replacement, body)
            if count:
                break
        out[prefix + body] = value
    return out
