"""`export_checkpoint`: a distributed checkpoint (any world size) to PEFT's format, in one process.

Reads the full tensors straight from the checkpoint files (no model, no process group needed) and writes what
`save_pretrained` writes: ``adapter_config.json`` + ``adapter_model.safetensors``, the ``default`` adapter at the
top of `out_dir` and every other adapter in a subfolder named after it.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed.checkpoint as dcp

from dpeft.checkpoint.dcp import resolve_checkpoint
from dpeft.checkpoint.dcp_manifest import read_manifest, verify_checksums
from dpeft.checkpoint.integrity import check_read_back
from dpeft.config import get_peft_config
from dpeft.model.model_hooks import saved_state
from dpeft.model.prompt import exported_prompt_state
from dpeft.store import save_adapter_weights


def read_adapter_tensors(path: str) -> dict[str, dict[str, torch.Tensor]]:
    """adapter name -> {PEFT key: full tensor} of checkpoint `path` (checksums verified first)."""
    manifest = read_manifest(path)
    verify_checksums(path, manifest)
    state = {
        key: torch.empty(info["shape"], dtype=getattr(torch, info["dtype"]))
        for key, info in manifest["tensors"].items()
    }
    with warnings.catch_warnings():  # DCP warns that no_dist means one process: that is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, no_dist=True)
    check_read_back(path, state, manifest)  # before anything is written
    out: dict[str, dict[str, torch.Tensor]] = {name: {} for name in manifest["adapters"]}
    for key, tensor in state.items():
        _, adapter, peft_key = key.split("/", 2)
        out[adapter][peft_key] = tensor
    return out


def export_checkpoint(path: str, out_dir: str) -> str:
    """Write checkpoint `path` (a step directory, or a root: its newest complete step) as PEFT-format adapters
    under `out_dir`; returns the step directory exported.

    Raises:
        ValueError: if `path` is not a complete, intact checkpoint, or `out_dir` is a file.
    """
    if os.path.isfile(out_dir):
        raise ValueError(f"output {out_dir!r} is a file; pass a directory")
    import dpeft.methods  # noqa: F401 - registers the config classes the manifest names

    path = resolve_checkpoint(path)
    manifest = read_manifest(path)
    tensors = read_adapter_tensors(path)
    for name, config_dict in manifest["adapters"].items():
        directory = out_dir if name == "default" else os.path.join(out_dir, name)
        config = get_peft_config({**config_dict, "inference_mode": True})
        state = tensors[name]
        if config.is_prompt_learning:  # PEFT saves the prompt encoder's output, computed from the saved encoder
            state = exported_prompt_state(get_peft_config(dict(config_dict)), state)
        # The method's saving rules apply as in save_pretrained (e.g. AdaLoRA drops pruned triplets).
        save_adapter_weights(saved_state(config, name, state), directory)
        config.save_pretrained(directory)
    return path
