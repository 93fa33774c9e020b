"""Reading and writing the tensors of PEFT's single-file adapter format (`adapter_model.safetensors`)."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

from dpeft.config.atomic_file import publish_atomically
from dpeft.store.safetensors_io import save_safetensors

SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"


def save_adapter_weights(
    state_dict: dict[str, torch.Tensor], directory: str, *, safe_serialization: bool = True
) -> str:
    """Write `state_dict` atomically (temporary file, then rename); returns the file written."""
    os.makedirs(directory, exist_ok=True)
    name = SAFETENSORS_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME
    path = os.path.join(directory, name)
    if safe_serialization:
        # Straight from each tensor's memory; views and shared storage are fine (each is written as its own bytes).
        save_safetensors(state_dict, path, metadata={"format": "pt"})
        return path
    # torch.save would store a view's whole storage: dense copies keep the file to the adapter's own size.
    tensors = {
        k: v
        if v.is_contiguous() and v.storage_offset() == 0 and v.untyped_storage().nbytes() == v.nbytes
        else v.contiguous().clone()
        for k, v in state_dict.items()
    }

    def write(fd: int) -> None:
        with os.fdopen(fd, "wb", closefd=False) as f:
            torch.save(tensors, f)

    publish_atomically(path, write)
    return path


def load_adapter_weights(directory: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read the adapter tensors in `directory` (safetensors preferred, PEFT's `.bin` accepted)."""
    st = os.path.join(directory, SAFETENSORS_WEIGHTS_NAME)
    if os.path.isfile(st):
        try:
            return load_file(st, device=str(device))
        except Exception as exc:  # safetensors raises its own error types for truncated or corrupt files
            raise ValueError(f"cannot read {st}: {exc}. The file is corrupt or truncated; save it again.") from exc
    binary = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(binary):
        return torch.load(binary, map_location=device, weights_only=True)
    raise ValueError(f"no {SAFETENSORS_WEIGHTS_NAME} or {WEIGHTS_NAME} in {directory!r}")
