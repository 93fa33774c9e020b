"""`merge_checkpoint`: fold adapters into a sharded HF safetensors checkpoint, tensor by tensor, on many ranks.

Every rank plans the same output shards from the base's tensor names and sizes, validates the adapters against
the base (nothing is written if anything does not fit), then writes only its own shards into ``OUT.tmp-<id>``;
each merged tensor is computed by the method layer's own `merge_weight`/`merged_bias` (the code
`merge_and_unload` runs), other tensors are copied byte for byte. Rank 0 writes the index, copies the config and
tokenizer files, and renames the folder to ``OUT`` once every rank has finished: a crash never leaves ``OUT``.

Several adapters merge in turn, each weight scaling the change its adapter makes:
``W_k = W_{k-1} + w_k * (merge_k(W_{k-1}) - W_{k-1})``; with all weights 1 this is exactly merging them one after
another (for LoRA: ``W + sum_k w_k * delta_k``).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from dpeft import dist
from dpeft.checkpoint.hf_shards import (
    SAFE_WEIGHTS_INDEX_NAME,
    OutTensor,
    ShardWriter,
    TensorFiles,
    assign_shards,
    base_weight_files,
    parse_size,
    plan_shards,
    shard_file_names,
    write_index,
)
from dpeft.checkpoint.merge_plan import (
    AdapterSource,
    Step,
    build_plan,
    build_skeleton,
    check_base_name,
    rehearse,
    run_steps,
)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_MERGE_DTYPES = {"keep": None, "float32": torch.float32}
try:
    _LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None
except OSError:  # a libc without that name (e.g. musl): memory is then only returned when malloc chooses to
    _LIBC = None


@dataclass
class _Job:
    """What every rank knows after planning: inputs, the merge steps and the output plan."""

    base_dir: str
    out_dir: str
    base: TensorFiles
    sources: list[AdapterSource]
    plan: dict[str, list[Step]]
    weights: list[float]
    compute: torch.dtype | None
    shards: list[list[OutTensor]]
    names: list[str]
    safe_merge: bool
    rss_start: int = 0  # this process's RSS before it writes anything (to bound what it keeps)


@dataclass
class MergeReport:
    """What a merge changed (or, for a dry run, would change).

    Attributes:
        out_dir: The published output folder (None for a dry run).
        changed: Base tensor name -> (shape, dtype, indices of the adapters that change it).
        shards: Output file names, in order.
        total_bytes: Bytes of the whole output.
        rank_bytes: Bytes this rank wrote.
        seconds: Wall time of this rank.
    """

    out_dir: str | None
    changed: dict[str, tuple[tuple[int, ...], str, list[int]]] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)
    total_bytes: int = 0
    rank_bytes: int = 0
    seconds: float = 0.0

    def describe(self) -> str:
        """A table of the tensors that change."""
        lines = [f"{'tensor':<60} {'shape':<18} {'dtype':<6} adapters"]
        for name, (shape, dtype, adapters) in self.changed.items():
            lines.append(f"{name:<60} {str(list(shape)):<18} {dtype:<6} {adapters}")
        lines.append(
            f"{len(self.changed)} tensors change; output: {len(self.shards)} file(s), {self.total_bytes / 1e6:.1f} MB"
        )
        return "\n".join(lines)


def merge_checkpoint(
    base_dir: str,
    adapters: list[str],
    out_dir: str,
    *,
    weights: list[float] | None = None,
    shard_size: int | str = "5GB",
    merge_dtype: str = "keep",
    dry_run: bool = False,
    overwrite: bool = False,
    ignore_name_mismatch: bool = False,
    progress: bool = True,
    safe_merge: bool = False,
) -> MergeReport:
    """Merge `adapters` into the safetensors checkpoint in `base_dir` and write the result to `out_dir`.

    Under torchrun (a process group initialised, e.g. by `dpeft.dist.init_distributed`) the output shards are
    split across ranks; `out_dir` must then be on a file system every rank sees.

    Args:
        base_dir: HF model folder: ``config.json`` plus ``model.safetensors`` or shards and their index.
        adapters: PEFT-format adapter folders, merged in this order.
        out_dir: Output folder; refused if it exists, unless `overwrite`.
        weights: One weight per adapter scaling the change it makes (default 1 each).
        shard_size: Largest output file, e.g. ``"2GB"`` (a tensor larger than that gets a file of its own).
        merge_dtype: ``"keep"`` computes in the base dtype (as `merge_and_unload` does); ``"float32"`` upcasts for
            the merge. The output keeps the base dtype either way.
        dry_run: Validate and report what would change; write nothing.
        overwrite: Replace an existing `out_dir` (only once the new one is complete).
        ignore_name_mismatch: Merge even if an adapter's `base_model_name_or_path` names another folder.
        progress: Show a progress bar over tensors (rank 0).
        safe_merge: Check every merged tensor for NaN and inf (off by default, as in `merge_and_unload`).

    Returns:
        A `MergeReport`.

    Raises:
        ValueError: For any argument, adapter or base tensor that does not fit, before anything is written.
    """
    start = time.perf_counter()
    weights = _check_args(base_dir, adapters, out_dir, weights, merge_dtype, overwrite, dry_run)
    sources = [AdapterSource(a) for a in adapters]
    if not ignore_name_mismatch:
        for source in sources:
            check_base_name(source.config, base_dir, source.path)
    base = TensorFiles(base_weight_files(base_dir))
    skeleton = build_skeleton(base_dir, [s.config for s in sources])
    plan = build_plan(skeleton, base, sources)
    compute = _MERGE_DTYPES[merge_dtype]
    changed = rehearse(plan, base, sources, compute)

    tensors = [OutTensor(n, i.dtype, i.shape) for n, i in base.infos.items()]
    shards = plan_shards(tensors, parse_size(shard_size))
    names = shard_file_names(len(shards))
    report = MergeReport(None, changed, names, sum(t.nbytes for t in tensors))
    if dry_run:
        report.seconds = time.perf_counter() - start
        return report

    job = _Job(base_dir, out_dir, base, sources, plan, weights, compute, shards, names, safe_merge)
    report.rank_bytes = _write_and_publish(job, overwrite, progress)
    report.out_dir = out_dir
    report.seconds = time.perf_counter() - start
    return report


def _write_and_publish(job: _Job, overwrite: bool, progress: bool) -> int:
    """Write this rank's shards into a temporary folder; rank 0 publishes once all ranks succeeded.

    Returns:
        The bytes this rank wrote.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    job.rss_start = _rss_bytes()
    tmp = f"{os.path.normpath(job.out_dir)}.tmp-{dist.broadcast_object(uuid.uuid4().hex[:12])}"
    mine = assign_shards([sum(t.nbytes for t in s) for s in job.shards], world)[rank]
    error: BaseException | None = None
    written = 0
    try:
        os.makedirs(tmp, exist_ok=True)
        bar = tqdm(
            total=sum(len(job.shards[i]) for i in mine),
            disable=not progress or rank != 0,
            unit="tensor",
            desc=f"merge (rank {rank}/{world})",
        )
        for i in mine:
            _write_shard(job, os.path.join(tmp, job.names[i]), job.shards[i], bar)
            written += sum(t.nbytes for t in job.shards[i])
        bar.close()
    except BaseException as exc:  # noqa: BLE001 - every rank must reach the vote below, then it is re-raised
        error = exc
    # A vote rather than a barrier: a rank that failed still takes part, so no rank waits forever.
    failed = dist.all_reduce_mean(1.0 if error is not None else 0.0) > 0
    if not failed and rank == 0:
        try:
            _finish(tmp, job, overwrite)
        except BaseException as exc:  # noqa: BLE001
            error = exc
    failed = dist.all_reduce_mean(1.0 if error is not None else 0.0) > 0
    if failed:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise error
        raise RuntimeError("the merge failed on another rank (see its error); nothing was published")
    return written


def _check_args(
    base_dir: str,
    adapters: list[str],
    out_dir: str,
    weights: list[float] | None,
    merge_dtype: str,
    overwrite: bool,
    dry_run: bool,
) -> list[float]:
    if not adapters:
        raise ValueError("pass at least one adapter")
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise ValueError(f"got {len(weights)} weights for {len(adapters)} adapters; pass one weight per adapter")
    if merge_dtype not in _MERGE_DTYPES:
        raise ValueError(f"merge_dtype must be one of {list(_MERGE_DTYPES)}, got {merge_dtype!r}")
    if not os.path.isdir(base_dir):
        raise ValueError(f"base {base_dir!r} is not a directory")
    if os.path.abspath(out_dir) == os.path.abspath(base_dir):
        raise ValueError("the output folder is the base folder; choose another --out")
    if not dry_run and os.path.exists(out_dir) and not overwrite:
        raise ValueError(f"output {out_dir!r} exists; pass --overwrite (overwrite=True) to replace it")
    return weights


# ---------------------------------------------------------------------------------------------- writing
def _write_shard(job: _Job, path: str, tensors: list[OutTensor], bar) -> None:
    """Write one output shard, tensor by tensor: merged where the plan says so, else copied byte for byte."""
    writer = ShardWriter(path, tensors)
    shard_bytes = sum(t.nbytes for t in tensors)
    try:
        for t in tensors:
            steps = job.plan.get(t.name)
            if steps:
                merged = run_steps(job.base.get(t.name), steps, job.sources, job.weights, job.compute)
                if job.safe_merge and merged.is_floating_point() and not torch.isfinite(merged).all():
                    raise ValueError(f"merging gives NaN or inf in {t.name}; the adapter seems to be broken")
                writer.write(t.name, merged)
                del merged
                _release_memory(job.rss_start, max(shard_bytes // 2, 4 * t.nbytes))
            else:
                writer.copy_raw(t.name, job.base.infos[t.name])
            bar.update(1)
        writer.close()
    except BaseException:
        writer.abort()
        raise


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _release_memory(rss_start: int, allowance: int) -> None:
    """Give freed heap memory back to the OS once the process has grown by more than `allowance` (half the shard
    being written, or a few times the tensor): glibc otherwise keeps it and the peak RSS grows with fragmentation. Not
    after every tensor: memory handed back is page-faulted in again by the next tensor (with 50 MB shards, where
    it trims often, the merge ran up to 2x slower than without trimming)."""
    if _LIBC is not None and _rss_bytes() > rss_start + allowance:
        _LIBC.malloc_trim(0)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _finish(tmp: str, job: _Job, overwrite: bool) -> None:
    """Rank 0, after every shard is written: index, config and tokenizer files, then publish by renaming."""
    out_dir = job.out_dir
    if len(job.shards) > 1:
        write_index(tmp, job.shards, job.names)
    for name in sorted(os.listdir(job.base_dir)):
        src = os.path.join(job.base_dir, name)
        if os.path.isfile(src) and not name.endswith(_WEIGHT_SUFFIXES) and name != SAFE_WEIGHTS_INDEX_NAME:
            shutil.copyfile(src, os.path.join(tmp, name))
    _fsync_dir(tmp)
    if os.path.exists(out_dir):
        if not overwrite:
            raise ValueError(f"output {out_dir!r} was created by something else while merging; nothing was published")
        old = f"{os.path.normpath(out_dir)}.old-{uuid.uuid4().hex[:12]}"
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out_dir)
    _fsync_dir(os.path.dirname(os.path.abspath(out_dir)))


__all__ = ["MergeReport", "merge_checkpoint"]
