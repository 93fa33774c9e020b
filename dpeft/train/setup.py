"""Checks of a run config against the job, the store backend choice, and the PEFT model of a run."""

from __future__ import annotations

import os

import torch
from torch import nn

from dpeft.config.run_config import RunConfig
from dpeft.dist import DistInfo
from dpeft.train.data import PACKAGED
from dpeft.train.models import PACKAGED_MODELS

_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS"}


def validate(cfg: RunConfig) -> None:
    """Raise `ValueError` for settings that cannot run, before anything is built or written."""
    t = cfg.train
    if t.steps < 1 or t.global_batch_size < 1 or t.grad_accum_steps < 1:
        raise ValueError("train.steps, train.global_batch_size and train.grad_accum_steps must be >= 1")
    if t.global_batch_size % t.grad_accum_steps:
        raise ValueError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"train.grad_accum_steps={t.grad_accum_steps}"
        )
    unknown = sorted(set(t.eval_metrics) - {"loss", "accuracy", "perplexity"})
    if unknown or ("accuracy" in t.eval_metrics and cfg.model.task != "seq_cls"):
        raise ValueError(f"train.eval_metrics={t.eval_metrics}: use loss, perplexity, and accuracy (seq_cls only)")
    if cfg.data.source not in PACKAGED and not os.path.isfile(cfg.data.source):
        raise ValueError(
            f"data.source {cfg.data.source!r} is neither a packaged dataset {sorted(PACKAGED)} nor an "
            "existing local .jsonl/.csv/.txt file"
        )
    if cfg.model.source not in PACKAGED_MODELS and not os.path.isfile(os.path.join(cfg.model.source, "config.json")):
        raise ValueError(
            f"model.source {cfg.model.source!r} is neither a packaged model {list(PACKAGED_MODELS)} "
            "nor a local Hugging Face folder with a config.json"
        )
    if not isinstance(cfg.peft.get("peft_type"), str):
        raise ValueError("peft.peft_type must name the method, e.g. LORA")


def resolve_backend(backend: str, world_size: int) -> str:
    """'auto' is 'local' in one process and 'sharded' in a distributed job; one process is always 'local'
    (sharding over one rank would only add copies)."""
    if world_size == 1:
        return "local"
    return "sharded" if backend == "auto" else backend


def build_peft_model(model: nn.Module, cfg: RunConfig, backend: str, info: DistInfo) -> nn.Module:
    """Wrap `model` with the configured adapter (seeded: identical on every rank) and shard it when asked."""
    from dpeft.api import get_peft_model
    from dpeft.config import get_peft_config

    if cfg.train.global_batch_size % (info.world_size * cfg.train.grad_accum_steps):
        raise ValueError(
            f"train.global_batch_size={cfg.train.global_batch_size} must be a multiple of world size "
            f"({info.world_size}) x train.grad_accum_steps ({cfg.train.grad_accum_steps})"
        )
    peft = _with_run_defaults(dict(cfg.peft), cfg.train.steps)
    peft.setdefault("task_type", _TASK_TYPES[cfg.model.task])
    torch.manual_seed(cfg.train.seed)
    peft_model = get_peft_model(model, get_peft_config(peft))
    _check_model_hooks(peft_model)
    if backend == "deepspeed" and info.world_size > 1:
        from dpeft.dist.deepspeed import refuse_unsupported

        refuse_unsupported(peft_model)  # before anything else is built
    if backend == "sharded" and info.world_size > 1:
        peft_model.store.shard(info.group)
    if backend == "fsdp2" and info.world_size > 1:
        _wrap_fsdp(peft_model, cfg, info)
    return peft_model


def _with_run_defaults(peft: dict, steps: int) -> dict:
    """`peft` with the fields its method fills from the run where the config leaves them unset."""
    from dpeft.methods import get_method

    hooks_cls = get_method(peft["peft_type"]).model_hooks
    for key, value in (hooks_cls.run_defaults(steps) if hooks_cls is not None else {}).items():
        if peft.get(key) is None:
            peft[key] = value
    return peft


def _check_model_hooks(peft_model: nn.Module) -> None:
    """Refuse model-level training steps (an extra loss, a per-step update) this loop cannot run, never ignore them."""
    from dpeft.model.tuner import tuner_of

    hooks = [h for h in tuner_of(peft_model).model_hooks.values() if h.adds_training_steps]
    if not hooks:
        return
    peft_type = peft_model.peft_config["default"].peft_type
    missing = sorted({name for h in hooks if not h.trains_in_loop for name in h.exports})
    if missing:
        raise ValueError(
            f"peft_type {peft_type!r} adds model-level training steps (per-step {missing}) that dpeft.train.run "
            "does not run; train it in your own loop (see docs/adding_a_method.md, 'Model-level hooks')"
        )


def wrap_deepspeed(peft_model: nn.Module, optimizer: torch.optim.Optimizer, cfg: RunConfig, info: DistInfo):
    """DeepSpeed ZeRO over the run's optimizer (built on the store's tensors); returns the engine.

    DeepSpeed clips gradients itself (``gradient_clipping``) and steps at the last micro-batch of each step.
    """
    from dpeft.dist.deepspeed import apply_deepspeed

    t, store = cfg.train, cfg.store
    if t.mixed_precision == "fp16":
        raise ValueError("store.backend=deepspeed runs float32 or bf16 here; set train.mixed_precision to no or bf16")
    per_rank = t.global_batch_size // info.world_size
    return apply_deepspeed(
        peft_model,
        optimizer,
        zero_stage=store.deepspeed_zero_stage,
        micro_batch_size=per_rank // t.grad_accum_steps,
        grad_accum_steps=t.grad_accum_steps,
        max_grad_norm=cfg.optim.max_grad_norm,
        offload_optimizer=store.deepspeed_offload_optimizer and info.device.type == "cuda",
        offload_param=store.deepspeed_offload_param and info.device.type == "cuda",
    )


def _wrap_fsdp(peft_model: nn.Module, cfg: RunConfig, info: DistInfo) -> None:
    """FSDP2 over the data-parallel group with the run's mixed-precision, offload and reshard options."""
    from dpeft.dist.fsdp import apply_fsdp, default_mesh, mixed_precision

    store = cfg.store
    offload = None
    if store.fsdp_cpu_offload and info.device.type == "cuda":  # on a CPU run everything is on the CPU already
        from torch.distributed.fsdp import CPUOffloadPolicy

        offload = CPUOffloadPolicy()
    apply_fsdp(
        peft_model,
        default_mesh(info.group),
        mp_policy=mixed_precision(store.fsdp_param_dtype, store.fsdp_reduce_dtype),
        offload_policy=offload,
        reshard_after_forward=store.fsdp_reshard_after_forward,
    )
