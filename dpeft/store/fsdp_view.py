"""The `fsdp2` store backend: adapter tensors that FSDP2 (`fully_shard`) shards together with the base model.

`dpeft.dist.fsdp.apply_fsdp` wraps the model; FSDP2 then replaces every parameter of a wrapped module, adapter
tensors included, by a `DTensor` sharded on dim 0 over the data-parallel mesh, and swaps the registered parameter
for the unsharded one around each forward and backward. This view is what the store keeps of that:

- each entry's `params` are the sharded `DTensor` parameters (what the optimizer, `sharded_state_dict` and DCP see);
- `get` reads the parameters registered on the modules *now*, so inside a wrapped module's forward a method gets
  the unsharded tensors that FSDP2's pre-forward hook put there (and its gradients flow back through FSDP2's
  reduce-scatter into the shards' ``.grad``); outside that forward it all-gathers the shards, differentiably;
- full values (`state_dict`, merge) come from ``DTensor.full_tensor()``, a collective every rank joins;
- `plan_ownership` decides, before wrapping, which group owns a tensor shared by several blocks (the root);
  `refuse_foreign_fsdp` refuses a model that FSDP2 wrapped without `apply_fsdp` (accelerate's own wrapping).
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


def plan_ownership(
    entries: list, before: dict[int, list[tuple[nn.Module, str]]], blocks: list[nn.Module]
) -> tuple[set[nn.Parameter], list[nn.Parameter]]:
    """Which FSDP2 group owns each adapter tensor, decided before anything is wrapped.

    A tensor registered in one block belongs to that block's group. A tensor registered in several blocks (a
    model-level tensor shared by every layer: VeRA's projections, VB-LoRA's vector bank, RandLoRA's bases) belongs
    to the root group, as FSDP2 wants for parameters shared across groups: the blocks ignore it, and the root
    gathers it once per forward and reduce-scatters its gradient summed over every layer that read it. A frozen
    tensor registered nowhere (ShiRA's indices) stays a plain tensor, the same on every rank.

    Args:
        entries: The store's entries.
        before: `locate_parameters` of the module to wrap (the root).
        blocks: The modules that get a `fully_shard` group of their own.

    Returns:
        (the tensors the blocks must ignore, the frozen unregistered tensors to copy from rank 0).

    Raises:
        ValueError: for a trainable tensor registered nowhere under the root, or one shared by several blocks but
            registered nowhere outside them (no FSDP2 group could own it).
    """
    block_of = {id(m): i for i, block in enumerate(blocks) for m in block.modules()}
    root_owned, unregistered = set(), []
    for entry in entries:
        for name, param in entry.params.items():
            places = before.get(id(param), [])
            owners = {block_of.get(id(module), -1) for module, _ in places}
            if not places and not param.requires_grad:
                unregistered.append(param)
            elif not places:
                raise ValueError(
                    f"adapter tensor {entry.peft_key(name)} is trainable but registered nowhere under the module "
                    "given to apply_fsdp, so FSDP2 could not reduce its gradients over ranks; pass the PeftModel "
                    "itself (not its base_model)"
                )
            elif len(owners) > 1 and -1 not in owners:
                raise ValueError(
                    f"adapter tensor {entry.peft_key(name)} is shared by transformer blocks {sorted(owners)} but "
                    "registered nowhere outside them, so no FSDP2 group can own it; use the 'sharded' store backend"
                )
            elif len(owners) > 1:
                root_owned.add(param)
    return root_owned, unregistered


class FsdpView:
    """Where the tensors of a store's entries live once FSDP2 has wrapped the model.

    Args:
        slots: id(entry) -> [(tensor name, module, attribute)]: where each tensor is registered (module None: a
            frozen tensor registered nowhere, which the entry itself holds, replicated).
        localize: Turns the wrapped model back into plain modules with full parameters (a collective); set by
            `dpeft.dist.fsdp.apply_fsdp`, which knows how it wrapped the model.
    """

    def __init__(
        self, slots: dict[int, list[tuple[str, nn.Module | None, str]]], localize: Callable[[], None]
    ) -> None:
        self.slots = slots
        self.localize = localize

    @classmethod
    def after_wrap(cls, entries: list, before: dict[int, list[tuple[nn.Module, str]]], localize: Callable[[], None]):
        """Point `entries` at the parameters FSDP2 registered where their old ones were (found in `before`; see
        `plan_ownership` for the tensors registered at several places or nowhere)."""
        slots: dict[int, list[tuple[str, nn.Module | None, str]]] = {}
        for entry in entries:
            mine = slots[id(entry)] = []
            for name, param in entry.params.items():
                places = before.get(id(param), [(None, name)])
                module, leaf = places[0]  # FSDP2 registers a shared parameter at every place it had
                mine.append((name, module, leaf))
        for entry in entries:
            for name, module, leaf in slots[id(entry)]:
                if module is not None:
                    entry.params[name] = module._parameters[leaf]
        return cls(slots, localize)

    def get(self, entry) -> dict[str, torch.Tensor]:
        """The full tensors of `entry`: the unsharded ones FSDP2 registered inside a wrapped forward; outside one
        (a model-level loss term such as AdaLoRA's regulariser, or a read after the forward) the shards all-gathered
        differentiably, a collective that every rank runs as it runs the same forward."""
        try:
            slots = self.slots[id(entry)]
        except KeyError:
            raise ValueError(
                f"adapter {entry.adapter!r} on {entry.module_name} was added after apply_fsdp, so FSDP2 does not "
                "manage its tensors; add every adapter before wrapping the model with apply_fsdp"
            ) from None
        out = {}
        for name, module, leaf in slots:
            tensor = entry.params[name] if module is None else module._parameters[leaf]
            # A plain Parameter is the common case (inside the forward): no attribute lookup for it.
            if type(tensor) is not nn.Parameter and hasattr(tensor, "full_tensor"):
                tensor = tensor.full_tensor()
            out[name] = tensor
        return out

    def repoint(self, entries: list) -> None:
        """After `localize`: the entries' params are the plain parameters now registered."""
        for entry in entries:
            for name, module, leaf in self.slots.get(id(entry), []):
                if module is not None:
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


def refuse_foreign_fsdp(store) -> None:
    """Raise if something replaced the registered adapter tensors of a store on the local backend.

    accelerate's FSDP2 plugin (or ``fully_shard`` called directly) swaps every parameter where it is registered for
    a sharded `DTensor` (an unsharded plain tensor inside a forward), without `apply_fsdp` switching the store to its
    fsdp2 backend; the store would go on reading and saving the tensors it made, which nothing trains any more. One
    registered tensor tells (a wrapper replaces them all), so this is cheap enough to run on every forward and save.
    """
    if store.backend != "local":
        return
    for adapter in store.adapters:
        for entry in store.entries(adapter):
            for name, spec in entry.specs.items():
                if entry.owner is None or not spec.attach:
                    continue
                *path, leaf = spec.module_path(adapter)
                module = entry.owner
                for part in path:
                    module = module._modules.get(part) if module is not None else None
                registered = None if module is None else module._parameters.get(leaf)
                # Inside a wrapped forward FSDP2 registers unsharded plain tensors, so identity is the test.
                if registered is not None and registered is not entry.params[name]:
                    raise ValueError(
                        f"adapter tensor {entry.peft_key(name)} was replaced by a tensor that the adapter store does "
                        "not know (FSDP2 through accelerate's FSDP2 plugin or fully_shard on a dpeft model): training "
                        "would not change the adapter and saves would write its initial values. Wrap the model with "
                        "dpeft.dist.fsdp.apply_fsdp(model) first, then accelerator.prepare(model, optimizer) (it "
                        "leaves a model that is already wrapped as it is)"
                    )
                return
