"""`dpeft.ray.merge`: the streaming checkpoint merge as a Ray job, its output shards split over Ray workers.

Each Ray Train worker runs the same `dpeft.checkpoint.merge_checkpoint` that `dpeft merge` runs under torchrun, in
the torch process group Ray Train sets up (gloo: the ranks only vote and wait on each other; the work is file I/O),
so the two launchers write identical files. Paths must be on a file system that the driver and every worker see.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from dpeft.checkpoint import MergeReport, merge_checkpoint


def _merge_on_worker(config: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(config.pop("threads"))
    merge_checkpoint(config.pop("base_dir"), config.pop("adapters"), config.pop("out_dir"), **config)


def merge(
    base_dir: str,
    adapters: list[str],
    out_dir: str,
    *,
    num_workers: int = 2,
    resources_per_worker: dict[str, float] | None = None,
    address: str | None = None,
    runtime_env: dict[str, Any] | None = None,
    storage_path: str | None = None,
    threads_per_worker: int = 1,
    **merge_kwargs: Any,
) -> MergeReport:
    """Merge `adapters` into the checkpoint in `base_dir` on `num_workers` Ray workers; write `out_dir`.

    The arguments are checked on the driver first (a dry run: headers only), so a bad base, adapter or output
    folder raises `ValueError` here, before any worker starts or anything is written.

    Args:
        base_dir: HF model folder (``config.json`` + ``model.safetensors`` or shards and their index).
        adapters: PEFT-format adapter folders or dpeft distributed checkpoints (step or root), merged in order.
        out_dir: Output folder, published by rank 0 once every worker has written its shards.
        num_workers: Ray workers; output shards are split over them.
        resources_per_worker: Ray resources of each worker (default one CPU).
        address: An existing Ray cluster (``"auto"``, ``"ray://host:10001"``); None starts or reuses a local one.
        runtime_env: The job's Python environment the Ray way (``{"pip": [...], "env_vars": {...}}``); used when
            this call starts the Ray connection.
        storage_path: Where Ray Train keeps its run state (default: a temporary folder on the driver).
        threads_per_worker: torch threads in each worker.
        **merge_kwargs: `merge_checkpoint` options: weights, shard_size, merge_dtype, overwrite,
            ignore_name_mismatch, safe_merge, progress.

    Returns:
        The plan's `MergeReport` (what changed, the output files) with `out_dir` set and `seconds` the job's
        wall time (`rank_bytes` stays 0: the driver writes nothing).

    Raises:
        ValueError: For a bad argument, adapter or base, before any worker starts.
        RuntimeError: When a worker failed; nothing was published.
    """
    import time

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if "dry_run" in merge_kwargs:
        raise ValueError("dpeft.ray.merge has no dry_run: call dpeft.checkpoint.merge_checkpoint(..., dry_run=True)")
    start = time.perf_counter()
    base_dir, out_dir = os.path.abspath(base_dir), os.path.abspath(out_dir)
    adapters = [os.path.abspath(a) for a in adapters]
    if os.path.exists(out_dir) and not merge_kwargs.get("overwrite", False):  # a dry run does not look at it
        raise ValueError(f"output {out_dir!r} exists; pass overwrite=True to replace it")
    check = {k: v for k, v in merge_kwargs.items() if k != "progress"}
    report = merge_checkpoint(base_dir, adapters, out_dir, dry_run=True, progress=False, **check)
    if not ray.is_initialized():
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    config = dict(merge_kwargs, base_dir=base_dir, adapters=adapters, out_dir=out_dir, threads=threads_per_worker)
    with tempfile.TemporaryDirectory(prefix="dpeft-ray-merge-") as scratch:
        trainer = TorchTrainer(
            _merge_on_worker,
            train_loop_config=config,
            scaling_config=ScalingConfig(
                num_workers=num_workers, use_gpu=False, resources_per_worker=resources_per_worker or {"CPU": 1}
            ),
            run_config=RunConfig(name="dpeft-merge", storage_path=storage_path or scratch),
        )
        try:
            trainer.fit()
        except Exception as exc:  # Ray wraps the worker's error; say what it means for the output
            raise RuntimeError(f"the Ray merge job failed; nothing was published to {out_dir}: {exc}") from exc
    report.out_dir = out_dir
    report.seconds = time.perf_counter() - start
    return report
