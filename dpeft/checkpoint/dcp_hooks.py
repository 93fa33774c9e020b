"""Methods' model-level training state in distributed checkpoints (`dpeft.methods.hooks.ModelHooks.train_state`).

Each tensor is shaped like the local part of a store parameter (AdaLoRA's importance averages of ``lora_A``...), so
it is saved the way that parameter is: a ``Shard(0)`` `DTensor` over the logical shape under the sharded backend
(each rank writes its rows; a load at another world size reads the rows it now owns), the tensor itself otherwise.
Keys are ``hooks/<adapter>/<name>``; the manifest's ``"hooks"`` lists names, logical shapes and dtypes.

Config fields that training rewrites (`ModelHooks.train_config_fields`, AdaLoRA's ``rank_pattern``) are restored
from the manifest's adapter configs instead of being required to match the model's.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from dpeft.checkpoint.dcp_optim import dtype_named, is_dtensor, placed

_PREFIX = "hooks/"


def _state(tuner, store) -> dict[str, tuple[torch.nn.Parameter, torch.Tensor, tuple[int, ...], bool]]:
    """``hooks/<adapter>/<name>`` -> (parameter, local tensor, logical shape, sharded) of every adapter's hooks."""
    keys = store.param_keys()
    out = {}
    for adapter, hooks in tuner.model_hooks.items():
        for name, (param, value) in hooks.train_state().items():
            if store._deepspeed is not None:
                # ZeRO-3 parameters are flat partitions (shape [0]); no per-element statistic has a layout to follow.
                raise ValueError(
                    f"adapter {adapter!r} keeps training state ({name}) that checkpoints cannot save under the "
                    "deepspeed store backend; train it under the local or sharded backend"
                )
            _, shape, sharded = keys[id(param)]
            out[f"{_PREFIX}{adapter}/{name}"] = (param, value.detach(), shape, sharded)
    return out


def hook_state(tuner, store) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors for DCP, manifest entry ``{key: {"shape", "dtype"}}``) of the adapters' training state."""
    tensors, meta = {}, {}
    for key, (_, value, shape, sharded) in _state(tuner, store).items():
        tensors[key] = placed(store, value, shape, sharded)
        meta[key] = {"shape": list(shape), "dtype": str(value.dtype).removeprefix("torch.")}
    return tensors, meta


def hook_placeholders(tuner, store, manifest: dict[str, Any], path: str) -> dict[str, torch.Tensor]:
    """Tensors for DCP to read the checkpoint's training state into (checked against what the model keeps)."""
    mine = _state(tuner, store)
    saved = manifest.get("hooks")
    if saved is None:
        if mine:  # a checkpoint from before training state was saved: the model still loads, its state starts anew
            warnings.warn(
                f"checkpoint {path!r} holds no training state for {sorted(mine)[:3]}...; it starts from zero",
                stacklevel=3,
            )
        return {}
    # State of an adapter that keeps none here (AdaLoRA in inference mode: no allocator) is not read.
    keeping = {key.split("/")[1] for key in mine}
    saved = {key: v for key, v in saved.items() if key.split("/")[1] in keeping}
    if sorted(saved) != sorted(mine):
        extra, missing = sorted(set(saved) - set(mine)), sorted(set(mine) - set(saved))
        raise ValueError(
            f"checkpoint {path!r} holds other training state than the model keeps (only in the checkpoint: "
            f"{extra[:3]}; only in the model: {missing[:3]}); build the model with the checkpoint's adapter configs"
        )
    out = {}
    for key, (_, value, shape, sharded) in mine.items():
        if list(shape) != saved[key]["shape"]:
            raise ValueError(f"checkpoint {path!r}: {key} has shape {saved[key]['shape']}, the model {list(shape)}")
        dtype = dtype_named(saved[key]["dtype"])
        out[key] = placed(store, torch.empty_like(value, dtype=dtype), shape, sharded)
    return out


def apply_hook_state(tuner, store, loaded: dict[str, torch.Tensor]) -> None:
    """Install the training state read into `hook_placeholders`'s tensors."""
    if not loaded:
        return
    state = _state(tuner, store)
    for adapter, hooks in tuner.model_hooks.items():
        prefix = f"{_PREFIX}{adapter}/"
        tensors = {}
        for key, value in loaded.items():
            if key.startswith(prefix):
                param = state[key][0]
                # A local shard's state becomes local again; that of a DTensor parameter (fsdp2) stays a DTensor.
                tensors[key[len(prefix) :]] = (
                    value.to_local() if is_dtensor(value) and not is_dtensor(param) else value
                )
        if tensors:
            hooks.load_train_state(tensors)


def restored_config_fields(tuner, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """adapter -> {field: saved value} for the config fields its training rewrites (present in the checkpoint)."""
    out = {}
    for adapter, hooks in tuner.model_hooks.items():
        saved = manifest["adapters"].get(adapter, {})
        fields = {f: saved[f] for f in hooks.train_config_fields if f in saved}
        if fields:
            out[adapter] = fields
    return out
