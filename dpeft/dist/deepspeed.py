"""The `deepspeed` store backend: DeepSpeed ZeRO stage 2 or 3 over a dpeft model, with the store's tensors as the
optimized parameters and the base frozen.

`apply_deepspeed` calls `deepspeed.initialize` and tells the store (`store.use_deepspeed`) how to read and write
DeepSpeed's partitions, so everything built on the store keeps working unchanged:

- `store.state_dict` (save_pretrained, export, merge) gathers each tensor with DeepSpeed's own API
  (``deepspeed.zero.GatheredParameters`` under ZeRO-3; ZeRO-2 keeps full parameters on every rank);
- `store.sharded_state_dict` presents each tensor as the `sharded` backend does, a ``Shard(0)`` `DTensor` over the
  logical shape (rows ``torch.chunk`` gives this rank), so the same distributed checkpoints (`dpeft.checkpoint.dcp`)
  are written: they reshard, resume under any backend and export at any world size. ZeRO partitions are flat
  element ranges, not rows, so each tensor is gathered once (one at a time) to cut its rows: a save holds at most
  one full adapter tensor beyond the partitions;
- the optimizer state is saved per tensor in the format of `dpeft.checkpoint.dcp_optim` (``exp_avg`` etc. as
  ``Shard(0)`` `DTensor`s, read with ``safe_get_full_optimizer_state``), so a ZeRO checkpoint resumes a `sharded`
  run and the other way round.

Under ZeRO-3 DeepSpeed gathers a module's parameters around that module's forward. Adapter tensors live in holder
modules that never run a forward of their own, so every tensor under an adapted layer (its adapter tensors and its
base layer's weight, which DoRA and merging read outside the base layer's forward) is registered as an external
parameter of that layer (``register_external_parameter``): gathered for the adapted layer's forward and backward.

This module and `deepspeed_view` are the only ones that import deepspeed (lazily, inside functions);
``DS_ACCELERATOR=cpu`` is set when CUDA is missing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dpeft.dist.deepspeed_view import DeepSpeedView, gathered
from dpeft.store.projection import refuse_projected

ZERO_STAGES = (2, 3)


def import_deepspeed():
    """Import deepspeed for this machine: the CPU accelerator without CUDA, and no JIT build on CPU.

    DeepSpeed's torch comm backend JIT-compiles a shared-memory all-reduce op on CPU at start-up; it serves only
    inference all-reduces, costs a C++ build per fresh machine, and waits forever on the build lock an interrupted
    build leaves behind. dpeft's training never calls it, so on CPU it is skipped.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401 - the module whose start-up build is skipped below
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    return deepspeed


def init_deepspeed_distributed() -> None:
    """Join DeepSpeed's comm layer to the process group `dpeft.dist.init_distributed` created (gloo on CPU)."""
    if not dist.is_initialized():
        raise ValueError("the deepspeed backend needs a process group; call dpeft.dist.init_distributed() first")
    deepspeed = import_deepspeed()
    deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)


def deepspeed_config(
    zero_stage: int = 3,
    *,
    micro_batch_size: int = 1,
    grad_accum_steps: int = 1,
    max_grad_norm: float | None = None,
    offload_optimizer: bool = False,
    offload_param: bool = False,
    bf16: bool = False,
    param_persistence_threshold: int | None = None,
) -> dict[str, Any]:
    """A DeepSpeed config dict for ZeRO `zero_stage` (2 or 3) with an optimizer built by the caller.

    Args:
        zero_stage: 2 (gradients and optimizer state partitioned) or 3 (parameters too, base model included).
        micro_batch_size: Rows per rank per micro-batch (DeepSpeed checks it against its batch arithmetic only).
        grad_accum_steps: Micro-batches per optimizer step; `engine.step()` steps on every `grad_accum_steps`-th.
        max_grad_norm: Global gradient-norm clipping done by DeepSpeed (None: no clipping).
        offload_optimizer: Keep optimizer state on the CPU (meaningful on GPU; a no-op on a CPU run).
        offload_param: ZeRO-3 only: keep parameters on the CPU between uses.
        bf16: Train in bfloat16 with fp32 master weights.
        param_persistence_threshold: ZeRO-3: parameters with fewer elements stay whole on every rank (DeepSpeed's
            default, 1e5, keeps typical LoRA tensors and small bases unpartitioned); 0 partitions everything.
    """
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"zero_stage={zero_stage!r} is not available; choose one of {list(ZERO_STAGES)}")
    if offload_param and zero_stage != 3:
        raise ValueError("offload_param needs ZeRO stage 3 (stage 2 keeps full parameters on every rank)")
    zero: dict[str, Any] = {"stage": zero_stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if offload_param:
        zero["offload_param"] = {"device": "cpu"}
    if param_persistence_threshold is not None and zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = int(param_persistence_threshold)
    world = dist.get_world_size() if dist.is_initialized() else 1
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * world,
        "gradient_clipping": float(max_grad_norm or 0.0),
        "zero_optimization": zero,
        "bf16": {"enabled": bool(bf16)},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }


def _adapted_layers(model: nn.Module) -> Iterator[nn.Module]:
    from dpeft.model.tuner import tuner_of

    for module in tuner_of(model).model.modules():
        if hasattr(module, "entries") and hasattr(module, "base_layer"):
            yield module


def register_external_parameters(model: nn.Module) -> None:
    """ZeRO-3: make each forward that reads a store tensor gather it (see the module docstring).

    Tensors under an adapted layer are gathered for that layer's forward and backward. The others that the store
    declared (a prompt encoder's, read by the `PeftModel`'s own forward; a shared tensor no layer holds) are gathered
    for the whole model's. Adopted modules (``modules_to_save`` copies) run their own forward, which DeepSpeed already
    gathers; tensors outside the module tree (SHiRA's indices) are not DeepSpeed's and stay whole on every rank.
    """
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    covered: set[int] = set()
    for layer in _adapted_layers(model):
        for param in layer.parameters():
            register_external_parameter(layer, param)
            covered.add(id(param))
    in_model = {id(p) for p in model.parameters()}
    store = model.store
    for adapter in store.adapters:
        for entry in store.entries(adapter):
            if entry.owner is None:
                continue
            for param in entry.params.values():
                if id(param) in in_model and id(param) not in covered:
                    register_external_parameter(model, param)
                    covered.add(id(param))


def apply_deepspeed(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    zero_stage: int = 3,
    config: dict[str, Any] | None = None,
    **config_kwargs: Any,
):
    """Wrap a dpeft `PeftModel` with `deepspeed.initialize` (ZeRO 2 or 3) and switch its store to DeepSpeed.

    Args:
        model: A `PeftModel` built with `get_peft_model` (the store's tensors trainable, the base frozen).
        optimizer: A torch optimizer built on ``model.store.optimizer_parameters()``.
        zero_stage: 2 or 3 (ignored when `config` is given).
        config: A full DeepSpeed config; by default `deepspeed_config(zero_stage, **config_kwargs)`.

    Returns:
        The DeepSpeed engine: call it like the model, then ``engine.backward(loss)`` and ``engine.step()``;
        ``engine.optimizer`` is what `dpeft.checkpoint.save_checkpoint` takes as the optimizer.
    """
    store = getattr(model, "store", None)
    if store is None:
        raise TypeError(f"{type(model).__name__} has no dpeft adapter store; build it with dpeft.get_peft_model")
    if store.backend != "local":
        raise ValueError(f"the store already uses the {store.backend!r} backend; apply DeepSpeed to a fresh model")
    refuse_unsupported(model)
    params = {id(p) for p in store.optimizer_parameters()}
    foreign = [tuple(p.shape) for g in optimizer.param_groups for p in g["params"] if id(p) not in params]
    if foreign:
        raise ValueError(
            f"the optimizer holds {len(foreign)} parameter(s) the adapter store does not own (shapes {foreign[:3]}); "
            "build it on model.store.optimizer_parameters()"
        )
    config = dict(config) if config is not None else deepspeed_config(zero_stage, **config_kwargs)
    stage = int(config.get("zero_optimization", {}).get("stage", 0))
    if stage not in ZERO_STAGES:
        raise ValueError(f"DeepSpeed config zero_optimization.stage={stage}; the deepspeed backend supports 2 or 3")
    init_deepspeed_distributed()
    deepspeed = import_deepspeed()
    if stage == 3:
        register_external_parameters(model)
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    store.use_deepspeed(DeepSpeedView(stage, ds_optimizer))
    return engine


def refuse_unsupported(model: nn.Module) -> None:
    """Refuse, before DeepSpeed starts, what the deepspeed backend cannot run: model-level training steps (AdaLoRA's
    regulariser and rank allocation read per-element gradients after the step and the adapter tensors outside the
    forward, which DeepSpeed keeps in ZeRO partitions: param.grad is None, ZeRO-3 parameters are shape [0] outside
    the forward) and tensors projected in place before each read (`ParamSpec.project`, OFT's coft)."""
    from dpeft.model.tuner import tuner_of

    store = model.store
    refuse_projected((e for adapter in store.adapters for e in store.entries(adapter)), "deepspeed")
    hooks = [h for h in tuner_of(model).model_hooks.values() if h.adds_training_steps]
    if hooks:
        raise ValueError(
            f"peft_type {hooks[0].config.peft_type!r} adds model-level training steps (an extra loss, per-step "
            "updates that read gradients) that the deepspeed backend cannot run (DeepSpeed keeps gradients in ZeRO "
            "partitions, not param.grad); train it with the sharded or fsdp2 store backend"
        )


def attach_prepared(engine) -> nn.Module:
    """Switch the store of a dpeft model that another launcher (accelerate) passed through `deepspeed.initialize`.

    Args:
        engine: The DeepSpeed engine wrapping a dpeft `PeftModel` (what ``accelerator.prepare`` returned).

    Returns:
        The `PeftModel` (``engine.module``), whose store now reads and writes DeepSpeed's partitions.
    """
    stage = int(engine.zero_optimization_stage())
    if stage not in ZERO_STAGES:
        raise ValueError(f"the deepspeed backend supports ZeRO stage 2 or 3, not {stage}; set the plugin's zero_stage")
    model = engine.module
    refuse_unsupported(model)
    model.store.use_deepspeed(DeepSpeedView(stage, engine.optimizer))
    return model


def prepare_for_accelerate(model: nn.Module) -> nn.Module:
    """Call before creating the ``Accelerator`` with a DeepSpeed plugin: imports DeepSpeed the way this module does
    (no JIT build on CPU) and registers the tensors adapted layers read outside their children's forwards
    (needed by ZeRO-3, harmless under ZeRO-2)."""
    refuse_unsupported(model)
    import_deepspeed()
    register_external_parameters(model)
    return model


def merge_and_unload(model: nn.Module, **kwargs: Any) -> nn.Module:
    """`PeftModel.merge_and_unload` under ZeRO-3: each adapted layer is gathered, merged and re-partitioned in
    turn (one layer's full weights at a time), then the adapters are unloaded.

    Returns:
        The base model, still partitioned by ZeRO-3, now holding the merged weights (gather it to save or compare).
    """
    store = model.store
    view = store._deepspeed
    if view is not None and view.stage == 3:
        names = kwargs.get("adapter_names")
        for layer in _adapted_layers(model):
            with gathered(list(layer.parameters()), modify=True):
                layer.merge(safe_merge=kwargs.get("safe_merge", False), adapter_names=names)
    return model.merge_and_unload(**kwargs)


__all__ = [
    "DeepSpeedView",
    "apply_deepspeed",
    "attach_prepared",
    "deepspeed_config",
    "gathered",
    "import_deepspeed",
    "init_deepspeed_distributed",
    "merge_and_unload",
    "prepare_for_accelerate",
    "register_external_parameters",
]
