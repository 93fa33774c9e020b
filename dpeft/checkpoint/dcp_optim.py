"""Optimizer state in distributed checkpoints, for any `torch.optim` optimizer built on the store's parameters.

State tensors shaped like their parameter (AdamW's ``exp_avg``/``exp_avg_sq``, SGD's momentum) are saved the way
the parameter is: a `DTensor` sharded on dim 0 over the logical shape under the sharded backend, a full tensor
otherwise, so they reshard with it. Other tensors (``step``) are saved whole; non-tensor values and the param
groups' hyperparameters go into the manifest.
"""

from __future__ import annotations

from typing import Any

import torch

_PREFIX = "adapter/"


def dtype_named(name: str) -> torch.dtype:
    return getattr(torch, name)


def is_dtensor(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "to_local")


def placed(store, value: torch.Tensor, shape: tuple[int, ...], sharded: bool) -> torch.Tensor:
    """`value` (a rank's part) as DCP saves it: a DTensor of the full `shape` for a sharded-store tensor."""
    return store._sharded.as_dtensor(value, shape) if sharded else value


def _json_value(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return value


def _optim_key(param_key: str, name: str) -> str:
    return f"optim/{param_key.removeprefix(_PREFIX)}/{name}"


def _param_keys(store, optimizer) -> tuple[dict[int, tuple[str, tuple[int, ...], bool]], list[list[str]]]:
    keys = store.param_keys()
    groups = []
    for group in optimizer.param_groups:
        unknown = [tuple(p.shape) for p in group["params"] if id(p) not in keys]
        if unknown:
            raise ValueError(
                f"the optimizer holds {len(unknown)} parameter(s) the adapter store does not own (shapes "
                f"{unknown[:3]}); build it on model.store.optimizer_parameters()"
            )
        groups.append([keys[id(p)][0] for p in group["params"]])
    return keys, groups


def optimizer_state(store, optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors for DCP, manifest entry) of `optimizer`'s state."""
    if store._deepspeed is not None:  # DeepSpeed keeps flat partitions; its view presents them per tensor
        return store._deepspeed.optimizer_state(store)
    keys, groups = _param_keys(store, optimizer)
    tensors: dict[str, Any] = {}
    meta_groups, meta_state = [], {}
    for group, group_keys in zip(optimizer.param_groups, groups):
        hyper = {k: _json_value(v) for k, v in group.items() if k != "params"}
        meta_groups.append({**hyper, "params": group_keys})
        for param in group["params"]:
            key, shape, sharded = keys[id(param)]
            entries = {}
            for name, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(param.shape):
                    local = value.detach()
                    tensors[_optim_key(key, name)] = placed(store, local, shape, sharded)
                    entries[name] = {"kind": "param", "shape": list(shape), "dtype": str(value.dtype)[6:]}
                elif isinstance(value, torch.Tensor):
                    tensors[_optim_key(key, name)] = value.detach()
                    entries[name] = {"kind": "tensor", "shape": list(value.shape), "dtype": str(value.dtype)[6:]}
                else:
                    entries[name] = {"kind": "value", "value": _json_value(value)}
            if entries:
                meta_state[key] = entries
    return tensors, {"class": type(optimizer).__name__, "param_groups": meta_groups, "state": meta_state}


def load_optimizer_state(
    store, optimizer, meta: dict[str, Any], path: str, *, stage: str, loaded: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``stage="prepare"``: check the optimizer fits and return placeholders for DCP to fill;
    ``stage="apply"``: install the filled placeholders as the optimizer's state and hyperparameters."""
    if store._deepspeed is not None:
        return store._deepspeed.load_optimizer_state(store, meta, path, stage, loaded)
    keys, groups = _param_keys(store, optimizer)
    saved_groups = [g["params"] for g in meta["param_groups"]]
    if type(optimizer).__name__ != meta["class"] or saved_groups != groups:
        raise ValueError(
            f"checkpoint {path!r} holds {meta['class']} state for {sum(map(len, saved_groups))} parameters in "
            f"{len(saved_groups)} group(s); this optimizer is {type(optimizer).__name__} over "
            f"{sum(map(len, groups))} in {len(groups)}. Build the same optimizer on model.store.optimizer_parameters()"
        )
    if stage == "prepare":
        return _placeholders(store, optimizer, keys, meta)
    for group, saved in zip(optimizer.param_groups, meta["param_groups"]):
        for k, v in saved.items():
            if k != "params":
                group[k] = tuple(v) if isinstance(group.get(k), tuple) else v
    optimizer.state.clear()
    for group in optimizer.param_groups:
        for param in group["params"]:
            key = keys[id(param)][0]
            state = {}
            for name, info in meta["state"].get(key, {}).items():
                if info["kind"] == "value":
                    state[name] = info["value"]
                else:
                    value = loaded[_optim_key(key, name)]
                    # The state of a DTensor parameter (fsdp2) stays a DTensor; a local shard's becomes local.
                    state[name] = value.to_local() if is_dtensor(value) and not is_dtensor(param) else value
            if state:
                optimizer.state[param] = state
    return {}


def _placeholders(store, optimizer, keys, meta: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            key, shape, sharded = keys[id(param)]
            for name, info in meta["state"].get(key, {}).items():
                if info["kind"] == "param":
                    if is_dtensor(param):  # fsdp2: a DTensor placed like the parameter
                        out[_optim_key(key, name)] = torch.empty_like(param.detach(), dtype=dtype_named(info["dtype"]))
                        continue
                    local = torch.empty(param.shape, dtype=dtype_named(info["dtype"]), device=param.device)
                    out[_optim_key(key, name)] = placed(store, local, shape, sharded)
                elif info["kind"] == "tensor":
                    out[_optim_key(key, name)] = torch.empty(info["shape"], dtype=dtype_named(info["dtype"]))
    return out
