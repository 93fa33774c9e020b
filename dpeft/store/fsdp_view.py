"""The `fsdp2` store backend: adapter tensors that FSDP2 (`fully_shard`) shards together with the base model.

`dpeft.dist.fsdp.apply_fsdp` wraps the model; FSDP2 then replaces every parameter of a wrapped module, adapter
tensors included, by a `DTensor` sharded on dim 0 over the data-parallel mesh, and swaps the registered parameter
for the unsharded one around each forward and backward. This view is what the store keeps of that:

- each entry's `params` are the sharded `DTensor` parameters (what the optimizer, `sharded_state_dict` and DCP see);
- `get` reads the parameters registered on the modules *now*, so inside a wrapped module's forward a method gets
  the unsharded tensors that FSDP2's pre-forward hook put there (and its gradients flow back through FSDP2's
  reduce-scatter into the shards' ``.grad``);
- full values (`state_dict`, merge) come from ``DTensor.full_tensor()``, a collective every rank joins.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def locate_parameters(root: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(parameter) -> every (module, attribute) it is registered at under `root` (shared ones more than once)."""
    found: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in root.modules():
        for leaf, param in module._parameters.items():
            if param is not None:
                found.setdefault(id(param), []).append((module, leaf))
    return found


class FsdpView:
    """Where the tensors of a store's entries live once FSDP2 has wrapped the model.

    Args:
        slots: id(entry) -> [(tensor name, module, attribute)]: where each tensor is registered.
        localize: Turns the wrapped model back into plain modules with full parameters (a collective); set by
            `dpeft.dist.fsdp.apply_fsdp`, which knows how it wrapped the model.
    """

    def __init__(self, slots: dict[int, list[tuple[str, nn.Module, str]]], localize: Callable[[], None]) -> None:
        self.slots = slots
        self.localize = localize

    @classmethod
    def after_wrap(cls, entries: list, before: dict[int, list[tuple[nn.Module, str]]], localize: Callable[[], None]):
        """Point `entries` at the parameters FSDP2 registered where their old ones were (found in `before`).

        Raises:
            ValueError: for a tensor registered at several places (a shared tensor), which FSDP2 would shard
                once under one module while the others keep reading the old one.
        """
        slots: dict[int, list[tuple[str, nn.Module, str]]] = {}
        for entry in entries:
            mine = slots[id(entry)] = []
            for name, param in entry.params.items():
                places = before.get(id(param), [])
                if len(places) != 1:
                    where = "nowhere in the wrapped model" if not places else f"at {len(places)} places"
                    raise ValueError(
                        f"adapter tensor {entry.peft_key(name)} is registered {where}; the fsdp2 backend shards "
                        "tensors owned by one module only. Use the 'sharded' store backend for this adapter."
                    )
                module, leaf = places[0]
                mine.append((name, module, leaf))
        for entry in entries:
            for name, module, leaf in slots[id(entry)]:
                entry.params[name] = module._parameters[leaf]
        return cls(slots, localize)

    def get(self, entry) -> dict[str, torch.Tensor]:
        """The tensors registered for `entry` now: unsharded inside a wrapped forward, shards outside."""
        try:
            slots = self.slots[id(entry)]
        except KeyError:
            raise ValueError(
                f"adapter {entry.adapter!r} on {entry.module_name} was added after apply_fsdp, so FSDP2 does not "
                "manage its tensors; add every adapter before wrapping the model with apply_fsdp"
            ) from None
        return {name: module._parameters[leaf] for name, module, leaf in slots}

    def repoint(self, entries: list) -> None:
        """After `localize`: the entries' params are the plain parameters now registered."""
        for entry in entries:
            for name, module, leaf in self.slots.get(id(entry), []):
                entry.params[name] = module._parameters[leaf]

    def forget(self, entry) -> None:
        self.slots.pop(id(entry), None)


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """The full value of a (possibly `DTensor`) tensor, detached; a collective for a `DTensor`."""
    tensor = tensor.detach()
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


@torch.no_grad()
def load_full_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy this rank's part of the full tensor `value` into `param` (a dim-0 sharded `DTensor` or a plain tensor)."""
    if not hasattr(param, "to_local"):
        param.copy_(value)
        return
    from dpeft.store.sharded import ShardLayout  # imports torch.distributed: only when a DTensor is there

    mesh = param.device_mesh
    if mesh.ndim != 1 or any(not p.is_shard(0) for p in param.placements):
        raise ValueError(
            f"cannot load into a DTensor placed {param.placements} on a {mesh.ndim}-D mesh; "
            "the fsdp2 backend loads dim-0 shards on a 1-D mesh"
        )
    layout = ShardLayout.of(tuple(param.shape), mesh.get_local_rank(), mesh.size())
    param.to_local().copy_(value[layout.start : layout.start + layout.rows])
