"""Distributed training checkpoints: one directory per step, written by every rank, loadable at any world size.

Layout of ``root/step-XXXXXXXX`` (see docs/checkpoints.md):

- ``*.distcp`` + ``.metadata``: `torch.distributed.checkpoint` files. Adapter tensors are keyed
  ``adapter/<adapter>/<PEFT key>``, their optimizer state ``optim/<adapter>/<PEFT key>/<state name>``. Sharded
  tensors are `DTensor`s (``Shard(0)`` over the logical shape), so each rank writes only its rows and a load at
  another world size reads whichever rows it now owns.
- ``rng/rank-XXXXX.pt``: each rank's random number generator states.
- ``dpeft.json``: the manifest (adapter configs, world size and mesh, base-model fingerprint, dtypes, optimizer
  hyperparameters, the run state `extra`, sha256 of every file). Written last.

Saves are synchronous: `save_checkpoint` returns once the step directory is published. Every rank writes into
``root/.tmp-step-XXXXXXXX``; after a barrier rank 0 writes the manifest and renames the directory, so a process
killed mid-save leaves only a ``.tmp-`` directory that `latest_checkpoint` never returns.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from dpeft.checkpoint.dcp_hooks import apply_hook_state, hook_placeholders, hook_state, restored_config_fields
from dpeft.checkpoint.dcp_manifest import (
    FORMAT_VERSION,
    MANIFEST,
    base_fingerprint,
    check_compatible,
    file_checksums,
    read_manifest,
    rng_state,
    set_rng_state,
    verify_checksums,
    write_manifest,
)
from dpeft.checkpoint.dcp_optim import load_optimizer_state, optimizer_state
from dpeft.checkpoint.integrity import check_before_save, check_read_back
from dpeft.dist import barrier, get_rank, get_world_size, is_distributed
from dpeft.model.tuner import tuner_of
from dpeft.quant.merge import base_quantization

_STEP = re.compile(r"^step-(\d{8})$")


def _store_ids(store) -> set[int]:
    return {id(p) for p in store.parameters()}


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step-{step:08d}")


def save_checkpoint(
    root: str,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    extra: dict,
    keep_last: int | None = None,
) -> str:
    """Publish ``root/step-XXXXXXXX`` atomically (every rank calls this; it is synchronous).

    Args:
        root: Directory holding the step directories.
        step: The step number that names the directory.
        model: The `PeftModel` (or its `base_model`).
        optimizer: Built on ``model.store.optimizer_parameters()``; its state is saved sharded like the params.
        extra: JSON-able run state from rank 0 (step, data position, ...), returned by `load_checkpoint`.
        keep_last: Keep only the newest `keep_last` complete checkpoints (None keeps all).

    Returns:
        The published directory.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last!r}")
    try:
        json.dumps(extra)
    except TypeError as exc:
        raise ValueError(f"extra must be JSON-able (it goes into {MANIFEST}): {exc}") from exc
    tuner = tuner_of(model)
    store = tuner.store
    if store._sharded is not None:
        store._sharded.drain()  # no prefetch may be in flight under the checkpoint's collectives
    state = store.sharded_state_dict()
    # Checked before anything is written, on every rank (sums over shards are collectives); under fsdp2 the
    # fingerprint reads base shards with collectives too, so every rank computes it here, not rank 0 alone.
    norms = check_before_save(store, state)
    hooks_state, hooks_meta = hook_state(tuner, store)  # methods' training state (AdaLoRA's importance averages)
    fingerprint = base_fingerprint(tuner.model, _store_ids(store))
    final, tmp = step_dir(root, step), os.path.join(root, f".tmp-step-{step:08d}")
    rank = get_rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):  # left by a save that was killed
            shutil.rmtree(tmp)
        os.makedirs(os.path.join(tmp, "rng"))
    barrier()
    # Shapes and dtypes for the manifest, taken now: rank 0 alone must not read tensors later (a collective under
    # the deepspeed backend).
    layouts = {key: (list(t.shape), str(t.dtype).removeprefix("torch.")) for key, t in state.items()}
    optim_state, optim_meta = optimizer_state(store, optimizer) if optimizer is not None else ({}, None)
    state.update(optim_state)
    state.update(hooks_state)
    with _single_process_quiet():
        dcp.save(state, checkpoint_id=tmp, no_dist=not is_distributed())
    rng_file = os.path.join(tmp, "rng", f"rank-{rank:05d}.pt")
    torch.save(rng_state(), rng_file + ".part")
    os.replace(rng_file + ".part", rng_file)
    barrier()
    if rank == 0:
        manifest = _manifest(tuner, store, step, extra, optim_meta, tmp, fingerprint, norms, layouts)
        if hooks_meta:
            manifest["hooks"] = hooks_meta
        write_manifest(tmp, manifest)
        _publish(tmp, final)
        if keep_last is not None:
            for old in _complete_steps(root)[:-keep_last]:
                shutil.rmtree(step_dir(root, old), ignore_errors=True)
    barrier()
    return final


def _manifest(
    tuner,
    store,
    step: int,
    extra: dict,
    optim_meta: dict | None,
    directory: str,
    fingerprint: str,
    norms: dict,
    layouts: dict[str, tuple[list[int], str]],
) -> dict[str, Any]:
    tensors = {}
    for key, (shape, dtype) in layouts.items():
        tensors[key] = {"shape": shape, "dtype": dtype}
        if key in norms:  # what a later read must give back (checked by load_checkpoint and export)
            tensors[key]["sq_norm"] = norms[key]
    dtypes = sorted({t["dtype"] for t in tensors.values()})
    world = get_world_size()
    return {
        "format_version": FORMAT_VERSION,
        "step": step,
        "world_size": world,
        "mesh": {"shape": [world], "dim_names": ["dp"]},
        "backend": store.backend,
        "adapters": {name: config.to_dict() for name, config in tuner.peft_config.items()},
        "base_fingerprint": fingerprint,
        "base_quantization": base_quantization(tuner.model),  # None for a float base
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "tensors": tensors,
        "optimizer": optim_meta,
        "extra": extra,
        "files": file_checksums(directory),
    }


def _publish(tmp: str, final: str) -> None:
    if os.path.exists(final):  # saving the same step again: move the old one out of the way first
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fd = os.open(os.path.dirname(final) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)


def _complete_steps(root: str) -> list[int]:
    steps = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        found = _STEP.match(name)
        if found and os.path.isfile(os.path.join(root, name, MANIFEST)):
            steps.append(int(found.group(1)))
    return sorted(steps)


def latest_checkpoint(root: str) -> str | None:
    """The newest complete step directory under `root` (with a readable manifest), or None."""
    for step in reversed(_complete_steps(root)):
        path = step_dir(root, step)
        try:
            read_manifest(path)
        except ValueError:
            continue
        return path
    return None


def resolve_checkpoint(path: str) -> str:
    """`path` itself when it is a step directory; for a checkpoint root, its newest complete step (else `path`,
    so that reading it names the missing manifest)."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, MANIFEST)):
        return latest_checkpoint(path) or path
    return path


def load_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load adapter (and optimizer) state and this rank's RNG from checkpoint `path`, at any world size.

    Every rank calls this. Nothing is changed unless the manifest is present, every file's checksum matches, and
    the checkpoint's base model and adapter configs match `model`.

    Returns:
        The `extra` dict given to `save_checkpoint`.

    Raises:
        ValueError: naming the file, adapter or field at fault.
    """
    manifest = read_manifest(path)
    verify_checksums(path, manifest)
    tuner = tuner_of(model)
    store = tuner.store
    fingerprint = base_fingerprint(tuner.model, _store_ids(store))
    # Config fields that training rewrites (AdaLoRA's rank_pattern) come from the checkpoint, not the model.
    restored = restored_config_fields(tuner, manifest)
    configs = {n: {**c.to_dict(), **restored.get(n, {})} for n, c in tuner.peft_config.items()}
    check_compatible(path, manifest, fingerprint, configs)
    if store._sharded is not None:
        store._sharded.drain()
    state = store.sharded_state_dict()
    _check_tensors(path, manifest, state)
    placeholders = {}
    if optimizer is not None:
        if manifest.get("optimizer") is None:
            raise ValueError(f"checkpoint {path!r} holds no optimizer state; call load_checkpoint without optimizer")
        placeholders = load_optimizer_state(store, optimizer, manifest["optimizer"], path, stage="prepare")
    hooks_loaded = hook_placeholders(tuner, store, manifest, path)
    # Read into copies and check them against the manifest before the model's tensors change.
    staged = {key: tensor.clone() for key, tensor in state.items()}
    with _single_process_quiet():
        dcp.load({**staged, **placeholders, **hooks_loaded}, checkpoint_id=path, no_dist=not is_distributed())
    check_read_back(path, staged, manifest)
    with torch.no_grad():
        for key, tensor in staged.items():
            state[key].copy_(tensor)
    store.load_sharded(staged)  # where `state` held copies (deepspeed), write the values back into the model
    if optimizer is not None:
        load_optimizer_state(store, optimizer, manifest["optimizer"], path, stage="apply", loaded=placeholders)
    apply_hook_state(tuner, store, hooks_loaded)
    for adapter, fields in restored.items():
        for name, value in fields.items():
            setattr(tuner.peft_config[adapter], name, value)
    rng_file = os.path.join(path, "rng", f"rank-{get_rank():05d}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=True))
    barrier()
    return manifest["extra"]


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it assumes one process when no group exists; that is exactly what a W=1 run means."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _check_tensors(path: str, manifest: dict, state: dict) -> None:
    saved = manifest["tensors"]
    problems = [f"{k} missing from the checkpoint" for k in state if k not in saved]
    problems += [f"{k} in the checkpoint but not in the model" for k in saved if k not in state]
    problems += [
        f"{k}: checkpoint shape {tuple(saved[k]['shape'])} != model shape {tuple(t.shape)}"
        for k, t in state.items()
        if k in saved and tuple(saved[k]["shape"]) != tuple(t.shape)
    ]
    if problems:
        raise ValueError(f"checkpoint {path!r} does not fit the model: {'; '.join(problems[:5])}")


__all__ = ["latest_checkpoint", "load_checkpoint", "save_checkpoint", "step_dir"]
