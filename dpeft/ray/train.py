"""`dpeft.ray.train`: a run config trained by Ray Train, each worker running the same `dpeft.train.run(cfg)`.

Ray Train's `TorchTrainer` starts the workers and their torch process group (gloo on CPU, nccl on GPU); each worker
then calls `dpeft.train.run`, whose `init_distributed` joins that group. Nothing else about training differs from
torchrun: same loop, same store backend ('auto' is 'sharded'), same distributed checkpoints.

Checkpoints: every `checkpoint.every` steps dpeft writes its step directory under ``checkpoint.dir`` (a folder all
workers see); each worker then hands Ray only the files it wrote itself (its ``__<rank>_*.distcp`` shards and
``rng/rank-<rank>.pt``; rank 0 also the DCP metadata and the manifest) through ``ray.train.report(...,
checkpoint=...)``. Ray merges the workers' uploads into one directory in its storage, named like dpeft's
(``<storage_path>/<name>/step-XXXXXXXX``), which is itself a complete dpeft checkpoint: `dpeft export`, `dpeft
merge` and ``checkpoint.resume`` read it. Nothing is gathered on one worker. After a worker failure Ray restarts
the worker group (up to `max_failures` times) and every worker resumes from the newest checkpoint Ray holds. A
later run may resume any of these checkpoints at another number of workers (dpeft checkpoints reshard on load).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from collections.abc import Callable
from typing import Any

from dpeft.config.run_config import RunConfig, load_run_config

_RANK_FILE = (re.compile(r"^__(\d+)_\d+\.distcp$"), re.compile(r"^rank-(\d+)\.pt$"))


def _absolute(cfg: RunConfig) -> RunConfig:
    """`cfg` with the driver's relative paths made absolute: Ray workers do not start in the driver's folder."""

    def local(path: str | None) -> str | None:
        return os.path.abspath(path) if path and os.path.exists(path) else path

    out = dataclasses.replace(cfg)
    out.model = dataclasses.replace(cfg.model, source=local(cfg.model.source))
    out.data = dataclasses.replace(cfg.data, source=local(cfg.data.source))
    resume = cfg.checkpoint.resume
    resume = resume if resume in ("auto", "never") else os.path.abspath(resume)
    ckpt_dir = os.path.abspath(cfg.checkpoint.dir) if cfg.checkpoint.dir else None
    out.checkpoint = dataclasses.replace(cfg.checkpoint, dir=ckpt_dir, resume=resume)
    out.output = dataclasses.replace(cfg.output, dir=os.path.abspath(cfg.output.dir))
    return out


def own_files(step_dir: str, rank: int) -> list[str]:
    """The files of `step_dir` (relative paths) that worker `rank` uploads: those it wrote; rank 0 takes the rest.

    Together the ranks' lists hold every file exactly once, so Ray's merged upload is the whole checkpoint.
    """
    mine = []
    for folder, _, files in os.walk(step_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(folder, name), step_dir)
            owners = [int(m.group(1)) for m in (p.match(name) for p in _RANK_FILE) if m]
            if (owners[0] if owners else 0) == rank:
                mine.append(rel)
    return sorted(mine)


def _stage(step_dir: str, rank: int) -> str:
    """A folder beside `step_dir` holding hard links to this rank's files of it (copies where links fail)."""
    root, step = os.path.split(os.path.normpath(step_dir))
    stage = os.path.join(root, f".ray-upload-{step}-rank-{rank:05d}")  # the name in Ray's storage is set apart
    shutil.rmtree(stage, ignore_errors=True)
    for rel in own_files(step_dir, rank):
        src, dst = os.path.join(step_dir, rel), os.path.join(stage, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:  # another file system, or links not allowed
            shutil.copy2(src, dst)
    os.makedirs(stage, exist_ok=True)
    return stage


class _RayReporter:
    """`run`'s ``on_report``: checkpoints (this worker's files) with their step's metrics, and the closing record,
    to ``ray.train.report``; every record to the user's hook.

    Only those go to Ray: each ``ray.train.report`` is a barrier through Ray's controller (measured ~1.5 s per
    call on 2 loaded cores, ten times a tiny step), and Ray's result keeps only the metrics reported with the
    newest checkpoint anyway; every step's record is in metrics.jsonl. A checkpoint saved at the last step is held
    back and reported with the closing record (final validation, wall time), which then is ``result.metrics``.
    """

    def __init__(self, rank: int, last_step: int, user: Callable[[dict, str | None], None] | None) -> None:
        self.rank, self.last_step, self.user = rank, last_step, user
        self.held: tuple[dict, str] | None = None

    def __call__(self, metrics: dict, checkpoint_dir: str | None) -> None:
        if checkpoint_dir is not None and metrics.get("step") == self.last_step and "event" not in metrics:
            self.held = (metrics, checkpoint_dir)
        elif self.held is not None:
            self._report({**self.held[0], **metrics}, self.held[1])
            self.held = None
        elif checkpoint_dir is not None or "event" in metrics:
            self._report(metrics, checkpoint_dir)
        if self.user is not None:
            self.user(metrics, checkpoint_dir)

    def _report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        import ray.train

        if checkpoint_dir is None:
            ray.train.report(metrics)
            return
        stage = _stage(checkpoint_dir, self.rank)
        try:
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(stage),
                checkpoint_dir_name=os.path.basename(checkpoint_dir),
                delete_local_checkpoint_after_upload=False,
            )
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def _train_on_worker(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: `dpeft.train.run`, resumed from Ray's newest checkpoint if any."""
    import ray.train
    import torch

    from dpeft.train import run

    cfg = RunConfig.from_dict(config["cfg"])
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    reporter = _RayReporter(ray.train.get_context().get_world_rank(), cfg.train.steps, config["on_report"])
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        run(cfg, on_report=reporter)
        return
    # A restart after a failure (or a run continued under the same name): Ray's checkpoint is the truth.
    with checkpoint.as_directory() as path:
        cfg.checkpoint = dataclasses.replace(cfg.checkpoint, resume=path)
        run(cfg, on_report=reporter)


def _checked_config(cfg: RunConfig | str | os.PathLike, overrides: list[str] | None, num_workers: int) -> RunConfig:
    from dpeft.train.setup import validate

    if not isinstance(cfg, RunConfig):
        cfg = load_run_config(cfg, overrides)
    elif overrides:
        raise ValueError("overrides apply to a YAML path; for a RunConfig set its fields directly")
    if not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be an int >= 1, got {num_workers!r}")
    validate(cfg)
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "never") and not os.path.isdir(resume):
        raise ValueError(
            f"checkpoint.resume={resume!r} is not a checkpoint directory; use auto, never or the path of a "
            "step-XXXXXXXX folder (a dpeft or Ray checkpoint)"
        )
    t = cfg.train
    if t.global_batch_size % (num_workers * t.grad_accum_steps):
        raise ValueError(
            f"train.global_batch_size={t.global_batch_size} must be a multiple of num_workers={num_workers} x "
            f"train.grad_accum_steps={t.grad_accum_steps}; change one of them"
        )
    return _absolute(cfg)


def _storage(storage_path: str | None, cfg: RunConfig) -> str:
    if storage_path is None:
        return os.path.join(cfg.output.dir, "ray")
    return storage_path if "://" in storage_path else os.path.abspath(storage_path)


def _connect(address: str | None, runtime_env: dict[str, Any] | None) -> bool:
    """Connect this process to Ray unless it already is; True when this call connected (and so disconnects)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, runtime_env=runtime_env)
        return True
    current = ray.get_runtime_context().gcs_address
    if address not in (None, "auto", current):
        raise ValueError(
            f"this process is already connected to the Ray cluster at {current}, not {address!r}; call "
            "ray.shutdown() first or leave address unset"
        )
    return False


def train(
    cfg: RunConfig | str | os.PathLike,
    overrides: list[str] | None = None,
    *,
    num_workers: int = 2,
    resources_per_worker: dict[str, float] | None = None,
    use_gpu: bool = False,
    address: str | None = None,
    runtime_env: dict[str, Any] | None = None,
    storage_path: str | None = None,
    name: str = "dpeft-train",
    max_failures: int = 0,
    on_report: Callable[[dict, str | None], None] | None = None,
):
    """Train `cfg` on `num_workers` Ray Train workers, each running `dpeft.train.run(cfg)`.

    Args:
        cfg: A `RunConfig`, or the path of a YAML run config.
        overrides: Dotted ``section.field=value`` overrides applied to a YAML path.
        num_workers: Ray Train workers (data-parallel ranks); must divide ``train.global_batch_size``.
        resources_per_worker: Ray resources of each worker (default one CPU, or one GPU with `use_gpu`).
        use_gpu: One GPU per worker and nccl. ``train.device=auto`` becomes cuda with it, cpu (gloo) without.
        address: An existing Ray cluster (``"auto"``, ``"ray://head:10001"``, a GCS address); None reuses this
            process's Ray connection or starts a local cluster.
        runtime_env: The workers' Python environment the Ray way (``{"pip": [...], "env_vars": {...},
            "working_dir": ...}``): the job's environment when this call connects to Ray, else the workers'.
        storage_path: Where Ray keeps results and checkpoints (shared storage for multi-node runs); default
            ``<output.dir>/ray``.
        name: Ray's run name; checkpoints go to ``<storage_path>/<name>/step-XXXXXXXX``. Ray continues a run whose
            name and storage already hold checkpoints.
        max_failures: How many times Ray restarts the worker group after a failure (each time from the newest
            checkpoint Ray holds; -1 = without limit). Set ``checkpoint.every`` so there is one to resume from.
        on_report: Called on every worker with each report of the run, ``on_report(metrics, checkpoint_dir)`` (see
            `dpeft.train.run`); must be picklable.

    Returns:
        Ray's ``ray.train.Result``: ``checkpoint`` is the newest checkpoint in Ray's storage and ``metrics`` what
        was reported with it; when ``checkpoint.every`` divides ``train.steps`` that is the last step's record
        merged with the run's closing record (``validation``, ``wall_time``, ...). The PEFT-format adapter is in
        ``<output.dir>/adapter`` and metrics.jsonl in ``output.dir`` as for any run.

    Raises:
        ValueError: For a config that cannot run at this number of workers, before Ray starts.
        ray.train.TrainingFailedError: When the workers failed more than `max_failures` times.
    """
    cfg = _checked_config(cfg, overrides, num_workers)
    if not use_gpu and cfg.train.device == "cuda":
        raise ValueError("train.device=cuda needs GPUs for the workers: pass use_gpu=True (--use-gpu)")
    if cfg.train.device == "auto":  # what the workers get from Ray, not what the driver's machine has
        cfg.train = dataclasses.replace(cfg.train, device="cuda" if use_gpu else "cpu")
    if not isinstance(max_failures, int) or max_failures < -1:
        raise ValueError(f"max_failures must be an int >= -1 (-1 = without limit), got {max_failures!r}")

    import ray
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    connected_here = _connect(address, runtime_env)
    try:
        trainer = TorchTrainer(
            _train_on_worker,
            train_loop_config={"cfg": cfg.to_dict(), "on_report": on_report},
            torch_config=TorchConfig(backend="nccl" if cfg.train.device == "cuda" else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources_per_worker
            ),
            run_config=RayRunConfig(
                name=name,
                storage_path=_storage(storage_path, cfg),
                failure_config=FailureConfig(max_failures=max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
                worker_runtime_env=None if connected_here else runtime_env,
            ),
        )
        return trainer.fit()
    finally:
        if connected_here:
            ray.shutdown()


__all__ = ["own_files", "train"]
