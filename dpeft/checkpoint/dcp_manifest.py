"""The manifest of a distributed checkpoint (`dpeft.json`): what was saved, from what, and file checksums.

A step directory counts as a checkpoint only when its manifest exists; the manifest is written last, after every
rank finished writing, and lists the sha256 of every other file, so a corrupted or truncated shard is caught
before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any

import torch
from torch import nn

MANIFEST = "dpeft.json"
FORMAT_VERSION = 1
#: Config fields that may differ between the saving and the loading model (they do not change any tensor).
_CONFIG_FIELDS_IGNORED = frozenset({"inference_mode", "base_model_name_or_path", "revision", "peft_version"})


def sha256_file(path: str, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def file_checksums(directory: str) -> dict[str, str]:
    """Relative path -> sha256 of every file under `directory` except the manifest."""
    out = {}
    for dirpath, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, directory)
            if rel != MANIFEST:
                out[rel] = sha256_file(path)
    return dict(sorted(out.items()))


def base_fingerprint(model: nn.Module, adapter_param_ids: set[int]) -> str:
    """A hash of the base model: parameter names, shapes, dtypes and three values of each.

    Adapter tensors and copied modules are left out, and wrapper segments (``base_layer``, ``original_module``)
    are dropped from names, so the fingerprint depends on the base model only, not on the adapter config.
    """
    rows = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if id(param) in adapter_param_ids or ".modules_to_save." in f".{name}.":
                continue
            clean = name.replace(".base_layer.", ".").replace(".original_module.", ".")
            shape = list(getattr(param, "ds_shape", param.shape))  # a ZeRO-3 partition keeps its shape there
            n = math.prod(shape)
            values = _elements(param, [0, n // 2, n - 1]) if n else []
            rows.append([clean, shape, str(param.dtype), [float.hex(v) for v in values]])
    rows.sort()
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def _elements(tensor: torch.Tensor, positions: list[int]) -> list[float]:
    """Elements at flat `positions` of the full tensor; for a dim-0 sharded `DTensor` (fsdp2's base weights) each
    rank gives the ones it holds and one all-reduce adds them up (a collective: every rank calls it)."""
    if hasattr(tensor, "ds_tensor"):  # DeepSpeed ZeRO-3: this rank holds flat elements [r*p, (r+1)*p)
        return _partition_elements(tensor.ds_tensor.detach().reshape(-1), positions)
    tensor = tensor.detach()
    if not hasattr(tensor, "to_local"):
        return tensor.reshape(-1)[positions].double().tolist()
    import torch.distributed as dist

    from dpeft.store.sharded import ShardLayout

    mesh = tensor.device_mesh
    layout = ShardLayout.of(tuple(tensor.shape), mesh.get_local_rank(), mesh.size())
    local = tensor.to_local().reshape(-1)
    row = max(layout.row_numel, 1)
    out = torch.zeros(len(positions), dtype=torch.float64, device=local.device)
    for i, pos in enumerate(positions):
        if layout.start <= pos // row < layout.start + layout.rows:
            out[i] = local[pos - layout.start * row].double()
    dist.all_reduce(out, group=mesh.get_group())
    return out.tolist()


def _partition_elements(part: torch.Tensor, positions: list[int]) -> list[float]:
    import torch.distributed as dist

    start = dist.get_rank() * part.numel()
    out = torch.zeros(len(positions), dtype=torch.float64, device=part.device)
    for i, pos in enumerate(positions):
        if start <= pos < start + part.numel():
            out[i] = part[pos - start].double()
    dist.all_reduce(out)
    return out.tolist()


def normalized_config(config_dict: dict[str, Any]) -> dict[str, Any]:
    data = json.loads(json.dumps(config_dict, sort_keys=True, default=str))
    return {k: v for k, v in data.items() if k not in _CONFIG_FIELDS_IGNORED}


def write_manifest(directory: str, manifest: dict[str, Any]) -> None:
    """Write the manifest atomically and durably (it is what makes the directory a checkpoint)."""
    path = os.path.join(directory, MANIFEST)
    part = path + ".part"
    with open(part, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def read_manifest(path: str) -> dict[str, Any]:
    """The manifest of checkpoint `path`.

    Raises:
        ValueError: if `path` is not a complete dpeft checkpoint.
    """
    file = os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        raise ValueError(
            f"{path!r} is not a complete dpeft checkpoint (no {MANIFEST}); it may be a save that was interrupted. "
            "Use dpeft.checkpoint.latest_checkpoint(root) to find the newest complete one."
        )
    try:
        with open(file, encoding="utf-8") as f:
            manifest = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file} is not valid JSON ({exc}); the checkpoint is damaged") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{file}: format_version {manifest.get('format_version')!r} is not {FORMAT_VERSION}; "
            "it was written by another dpeft version"
        )
    return manifest


def verify_checksums(path: str, manifest: dict[str, Any]) -> None:
    """Raise `ValueError` naming each file of checkpoint `path` that is missing or whose sha256 differs."""
    bad = []
    for rel, want in manifest["files"].items():
        file = os.path.join(path, rel)
        if not os.path.isfile(file):
            bad.append(f"{rel} (missing)")
        elif sha256_file(file) != want:
            bad.append(f"{rel} (checksum mismatch)")
    if bad:
        raise ValueError(
            f"checkpoint {path!r} is corrupted: {', '.join(bad)}. Load an earlier checkpoint "
            "(dpeft.checkpoint.latest_checkpoint skips none of these automatically) or save again."
        )


def check_compatible(path: str, manifest: dict[str, Any], fingerprint: str, configs: dict[str, dict]) -> None:
    """Raise `ValueError` when the checkpoint was saved from another base model or with other adapter configs."""
    if manifest["base_fingerprint"] != fingerprint:
        raise ValueError(
            f"checkpoint {path!r} was saved from a different base model (base fingerprint "
            f"{manifest['base_fingerprint'][:12]} != this model's {fingerprint[:12]}: parameter names, shapes, dtypes "
            "or values differ). Load it into the base model it was trained on."
        )
    saved = {k: normalized_config(v) for k, v in manifest["adapters"].items()}
    mine = {k: normalized_config(v) for k, v in configs.items()}
    if sorted(saved) != sorted(mine):
        raise ValueError(
            f"checkpoint {path!r} holds adapters {sorted(saved)} but the model has {sorted(mine)}; "
            "build the model with the same adapters"
        )
    for name in saved:
        diff = sorted(k for k in set(saved[name]) | set(mine[name]) if saved[name].get(k) != mine[name].get(k))
        if diff:
            detail = ", ".join(f"{k}: saved {saved[name].get(k)!r} != model {mine[name].get(k)!r}" for k in diff[:5])
            raise ValueError(
                f"checkpoint {path!r}: adapter {name!r} was saved with another config ({detail}); "
                "build the model with the checkpoint's config (it is in dpeft.json)"
            )


def rng_state() -> dict[str, Any]:
    """This process's random number generator states (torch CPU and CUDA, python, numpy when present)."""
    import random

    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        name, keys, pos, has_gauss, gauss = np.random.get_state()
        # as torch/python values, so the file loads with torch.load(weights_only=True)
        state["numpy"] = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    except ImportError:
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
