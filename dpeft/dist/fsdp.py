"""FSDP2 for a dpeft model: `apply_fsdp` shards base and adapter tensors together, block by block.

Each transformer block is one `fully_shard` group (its base weights and the adapter tensors of its layers are
all-gathered in one collective before the block's forward and reduce-scattered after its backward), then the root
module (the `PeftModel`) takes the rest (embeddings, final norm, head, adapters on them, prompt encoders, and
model-level tensors that several blocks share; see `dpeft.store.fsdp_view.plan_ownership`). Adapter tensors become
`DTensor`s on the same mesh as the base weights; the store switches to its `fsdp2` backend, which reads them where
FSDP2 registers them (see `dpeft.store.fsdp_view`). `unwrap_fsdp` undoes the wrapping with full values on every rank,
which is how `merge_and_unload` merges under FSDP2.

Works on CPU (gloo) and CUDA (nccl); the device mesh is 1-D over the data-parallel ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dpeft.store.fsdp_view import FsdpView, locate_parameters, plan_ownership
from dpeft.store.projection import refuse_projected
from dpeft.store.sharded import block_index
from dpeft.model.tuner import tuner_of

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_mesh(group=None):
    """A 1-D device mesh named ``("dp",)`` over `group` (default: every rank), on CUDA under nccl, else CPU."""
    from torch.distributed.device_mesh import DeviceMesh

    if not dist.is_initialized():
        raise ValueError("apply_fsdp needs a process group; call dpeft.dist.init_distributed() first (torchrun)")
    group = group if group is not None else dist.group.WORLD
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    return DeviceMesh.from_group(group, device, mesh_dim_names=("dp",))


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The outermost repeated blocks of `model` (``model.layers.3``, ``transformer.h.0``, ...), in order."""
    blocks = []
    for name, module in model.named_modules():
        head, _, last = name.rpartition(".")
        if last.isdigit() and block_index(name + ".x") >= 0 and block_index(head) < 0:
            blocks.append(module)
    return blocks


def mixed_precision(param_dtype: str | None, reduce_dtype: str | None):
    """FSDP2's `MixedPrecisionPolicy` from dtype names (None: the parameters' own dtype), or None if both None."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    for name in (param_dtype, reduce_dtype):
        if name is not None and name not in _DTYPES:
            raise ValueError(f"unknown dtype {name!r} for FSDP2 mixed precision; use one of {sorted(_DTYPES)}")
    if param_dtype is None and reduce_dtype is None:
        return None
    return MixedPrecisionPolicy(
        param_dtype=_DTYPES.get(param_dtype), reduce_dtype=_DTYPES.get(reduce_dtype), cast_forward_inputs=True
    )


#: Methods of the root that run the inner model without the root's `forward` (`generate` calls the inner model's
#: forward): FSDP2 gathers the root's parameters (embeddings, head) around them as around `forward`.
FORWARD_METHODS = ("generate",)


def apply_fsdp(
    model: nn.Module,
    mesh=None,
    *,
    mp_policy=None,
    offload_policy=None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard `model` (a dpeft `PeftModel`) with FSDP2 in place: each transformer block, then the root.

    Args:
        model: The `PeftModel` (or, without prompt learning, its `base_model`), which becomes the root of the
            wrapping; its store must still be on the ``local`` backend.
        mesh: A 1-D `DeviceMesh` over the data-parallel ranks (default: `default_mesh()`).
        mp_policy: A `torch.distributed.fsdp.MixedPrecisionPolicy` (see `mixed_precision`), or None.
        offload_policy: A `torch.distributed.fsdp.CPUOffloadPolicy` (CUDA runs; parameters, gradients and optimizer
            state stay on the CPU), or None.
        reshard_after_forward: Free each block's unsharded parameters after its forward (re-gather in backward):
            less memory, one more all-gather per block. The last block and the root never reshard after forward
            (their backward follows at once), as in FSDP2's default for the root and torchtitan's for the last block.

    Returns:
        `model`, wrapped; ``model.store.backend`` is ``"fsdp2"`` and the optimizer must be built after this call,
        on ``model.store.optimizer_parameters()`` (the sharded `DTensor` parameters). accelerate's
        ``Accelerator.prepare(model, optimizer)`` may follow: it leaves an FSDP2 module's wrapping as it is.

    Raises:
        ValueError: for a store not on the local backend, a mesh that is not 1-D, or an adapter tensor no FSDP2
            group could own (`plan_ownership`); raised before anything is wrapped.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy, fully_shard, register_fsdp_forward_method

    tuner = tuner_of(model)
    store = tuner.store
    if store.backend != "local":
        raise ValueError(f"apply_fsdp needs a store on the 'local' backend; this one is {store.backend!r}")
    refuse_projected((e for adapter in store.adapters for e in store.entries(adapter)), "fsdp2")
    mesh = mesh if mesh is not None else default_mesh()
    if mesh.ndim != 1:
        raise ValueError(f"apply_fsdp takes a 1-D data-parallel mesh; got a {mesh.ndim}-D one")
    # The root is the module the user calls: a prompt-learning PeftModel looks up the input embeddings and runs its
    # prompt encoders in its own forward, and model-level tensors (VeRA's projections) hang off the tuner.
    root = model
    entries = [e for adapter in store.adapters for e in store.entries(adapter)]
    before = locate_parameters(root)
    blocks = transformer_blocks(tuner.model)
    # Checked before anything is wrapped: a refused model is left as it was.
    root_owned, unregistered = plan_ownership(entries, before, blocks)
    kwargs = {
        "mesh": mesh,
        "reshard_after_forward": reshard_after_forward,
        "mp_policy": mp_policy or MixedPrecisionPolicy(),
        "offload_policy": offload_policy or OffloadPolicy(),
    }
    # Copies every rank's values from rank 0 first, as DDP and the sharded backend do: ranks may have
    # initialised adapters (or heads) with different random draws.
    src = dist.get_global_rank(mesh.get_group(), 0)
    for tensor in [*root.parameters(), *unregistered]:
        dist.broadcast(tensor.data, src=src, group=mesh.get_group())
    for i, block in enumerate(blocks):
        # The last block's backward comes right after its forward: resharding it would only gather it again.
        last = i == len(blocks) - 1
        ignored = {"ignored_params": root_owned} if root_owned else {}  # (None: FSDP2's plain path, as before)
        fully_shard(block, **{**kwargs, "reshard_after_forward": reshard_after_forward and not last, **ignored})
    # The root (embeddings, final norm, head, tensors shared by several blocks) is needed again as soon as backward
    # starts: kept unsharded between forward and backward, as FSDP2 itself does for a root by default.
    fully_shard(root, **{**kwargs, "reshard_after_forward": False})
    for method in FORWARD_METHODS:
        if callable(getattr(root, method, None)):
            register_fsdp_forward_method(root, method)
    store.use_fsdp(FsdpView.after_wrap(entries, before, lambda: unwrap_fsdp(root)))
    return model


@torch.no_grad()
def unwrap_fsdp(root: nn.Module) -> nn.Module:
    """Undo `fully_shard` on `root` and its submodules: every parameter becomes a plain full `nn.Parameter` (the
    same on every rank; a collective) and the modules lose FSDP2's hooks and class. Returns `root`."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    wrapped = [m for m in root.modules() if isinstance(m, FSDPModule)]
    for module in wrapped:
        module.reshard()  # the sharded DTensors are the values (a module kept unsharded after forward holds a copy)
    full: dict[int, nn.Parameter] = {}
    for module in root.modules():  # the same order on every rank: the collectives line up
        for leaf, param in list(module._parameters.items()):
            if param is None or not hasattr(param, "full_tensor"):
                continue
            if id(param) not in full:
                full[id(param)] = nn.Parameter(param.full_tensor().clone(), requires_grad=param.requires_grad)
            module._parameters[leaf] = full[id(param)]
    for module in wrapped:
        state = fully_shard.state(module)
        state._pre_forward_hook_handle.remove()
        state._post_forward_hook_handle.remove()
        for group in state._fsdp_param_groups:  # its state-dict hooks would register the shards again
            for handles in (
                group._module_to_pre_save_state_dict_hook_handle,
                group._module_to_pre_load_state_dict_hook_handle,
            ):
                for handle in handles.values():
                    handle.remove()
                handles.clear()
        for method in FORWARD_METHODS:
            module.__dict__.pop(method, None)  # `register_fsdp_forward_method`'s instance-level wrapper
        # FSDP2 puts its class first in the MRO: [FSDP<Orig>, FSDPModule, Orig, ...].
        module.__class__ = next(c for c in type(module).__mro__[1:] if not issubclass(c, FSDPModule))
    return root


__all__ = ["apply_fsdp", "default_mesh", "mixed_precision", "transformer_blocks", "unwrap_fsdp"]
