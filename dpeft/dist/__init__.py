"""Process groups for data-parallel runs: one `init_distributed()` for plain python, torchrun and Ray workers.

With ``WORLD_SIZE`` unset the run is one process and no process group exists (``group`` is None); under torchrun
(or anything that sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``) a gloo group is created on CPU and nccl on CUDA.
This package and `dpeft.store.sharded` are the only places that import `torch.distributed`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """Where this process sits in the data-parallel job.

    Attributes:
        rank: Global rank (0 in a single process).
        world_size: Number of processes (1 in a single process).
        local_rank: Rank on this node; selects the CUDA device.
        device: The device this rank computes on.
        group: The data-parallel process group, or None in a single process.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    group: object | None


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but CUDA is not available; use device='cpu' or 'auto'")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group the launcher describes (or run as one process when there is none).

    Args:
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``; picks gloo or nccl.
        timeout_s: Collective timeout.

    Returns:
        This rank's `DistInfo`; calling it again returns the same group. A default group that already exists (one
        Ray Train or the caller made) is joined as it is, provided its backend can run collectives on `device`.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if "WORLD_SIZE" not in os.environ and not dist.is_initialized():
        return DistInfo(0, 1, 0, dev, None)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    elif backend not in str(dist.get_backend()).replace(",", ":").split(":"):
        # e.g. "cpu:gloo,cuda:nccl" serves both; a plain nccl group cannot reduce CPU tensors, nor gloo CUDA ones.
        raise ValueError(
            f"the existing process group uses {dist.get_backend()!r}, which cannot run dpeft's collectives on "
            f"{dev.type}; use train.device={'cuda' if backend == 'gloo' else 'cpu'} or create the group with "
            f"backend {backend!r} (Ray: use_gpu={dev.type == 'cuda'})"
        )
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, dist.group.WORLD)


def destroy_distributed() -> None:
    """Leave the process group (a no-op in a single process)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def is_main_process() -> bool:
    return get_rank() == 0


def all_reduce_mean(x: float) -> float:
    """The mean of `x` over all ranks (as float64 on CPU for gloo, on the current CUDA device for nccl)."""
    if not is_distributed():
        return float(x)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(x)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of `params` over ranks in one flat all-reduce (DDP's result, for the local backend).

    A missing gradient counts as zeros, so every rank sends the same layout.
    """
    if not is_distributed():
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_object(obj: object, src: int = 0) -> object:
    """`obj` from rank `src` on every rank (identity in a single process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


__all__ = [
    "DistInfo",
    "all_reduce_grads",
    "all_reduce_mean",
    "barrier",
    "broadcast_object",
    "destroy_distributed",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
]
