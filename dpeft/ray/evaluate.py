"""`evaluate_adapters`: many adapters against one base model, on a pool of Ray actors.

Each actor builds the base model and the batches once (`dpeft.eval.AdapterEvaluator`) and then evaluates adapter
after adapter, swapping them through the store. The driver hands adapters out as actors free up (two in flight
per actor, so an actor never waits for the driver between adapters), gathers one row per adapter, and retries on
the surviving actors the adapters of an actor that died.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Sequence
from typing import Any

from dpeft.eval.driver import Adapters, advance, evaluate_in_process, finish, prepare, progress_bar
from dpeft.eval.evaluator import AdapterEvaluator, EvalSpec, MetricFn
from dpeft.eval.sources import AdapterRef

# Test hook: "NAME::MARKER" makes the actor that gets adapter NAME exit abruptly, once (while file MARKER is absent;
# it is created on the way out); "NAME::" makes every actor that gets NAME exit.
CRASH_ONCE_ENV = "_DPEFT_EVAL_CRASH_ONCE"
IN_FLIGHT_PER_ACTOR = 2


class EvalWorker:
    """The body of one Ray actor: an `AdapterEvaluator` built once, then called per adapter."""

    def __init__(self, spec: EvalSpec) -> None:
        self.evaluator = AdapterEvaluator(spec)

    def ready(self) -> int:
        return os.getpid()

    def evaluate(self, ref: AdapterRef) -> dict[str, Any]:
        _maybe_crash(ref.name)
        return {**self.evaluator.evaluate(ref), "actor_pid": os.getpid()}


def _maybe_crash(name: str) -> None:
    target, _, marker = os.environ.get(CRASH_ONCE_ENV, "").partition("::")
    if not target or target != name or (marker and os.path.exists(marker)):
        return
    if marker:
        open(marker, "w").close()  # noqa: SIM115 - the marker's existence is all that matters
    os._exit(1)


def evaluate_adapters(
    base: Any,
    adapters: Adapters,
    dataset: Any,
    metrics: str | MetricFn | Sequence[str | MetricFn] = ("loss",),
    *,
    num_actors: int = 2,
    address: str | None = None,
    runtime_env: dict | None = None,
    sort_by: str | None = None,
    descending: bool | None = None,
    output: str | os.PathLike | None = None,
    progress: bool = True,
    adapters_glob: Sequence[str] | str = (),
    num_cpus_per_actor: float = 1,
    num_gpus_per_actor: float = 0,
    max_retries: int = 2,
    **options: Any,
) -> list[dict[str, Any]]:
    """Evaluate every adapter on the same base model and data, in parallel on Ray actors; one row per adapter.

    Args:
        base: The base model: a `model.source` string (local HF folder, 'all-minilm-l6-v2', 'smollm2-135m',
            'tiny-llama'), a mapping of RunConfig `model` fields (``{"source": ..., "task": "seq_cls"}``), or a
            `ModelSection`.
        adapters: PEFT-format folders and/or distributed checkpoints (step dirs or roots), as paths or as a
            mapping row name -> path. Methods may be mixed.
        dataset: A `data.source` string, a mapping of RunConfig `data` fields, or a `DataSection`.
        metrics: 'loss', 'perplexity', 'accuracy' (seq_cls), and/or functions ``fn(model, batch) -> dict``.
        num_actors: Actors, each holding one copy of the base; 0 evaluates in this process without Ray.
        address: An existing Ray cluster to connect to; None starts a local one for this call (stopped after it).
            When this process is already connected to Ray, that connection is used either way.
        runtime_env: The actors' Ray runtime environment (``env_vars``, ``pip``, ``working_dir``, ...).
        sort_by: Metric to sort by (default: the first named metric); failed rows come last.
        descending: Higher first; default: ascending for loss/perplexity, descending otherwise.
        output: Also write the table here (``.csv``, ``.json`` or ``.jsonl``).
        progress: Show a progress bar over adapters.
        adapters_glob: Glob pattern(s) of adapter folders, added after `adapters`.
        num_cpus_per_actor: CPUs each actor reserves (also its torch thread count unless ``threads`` is given).
        num_gpus_per_actor: GPUs each actor reserves (the evaluator then computes on CUDA).
        max_retries: How many times an adapter is handed to another actor after its actor died.
        **options: `EvalSpec` fields: split ('all', 'validation', 'train'), batch_size, seed, device, threads.

    Returns:
        The rows, sorted: ``adapter``, ``status`` ('ok'/'error'), the metrics, ``method``, ``seconds``,
        ``attempts``, ``error``, ``path`` (and ``traceback`` for failures).

    Raises:
        ValueError: for a bad request (unknown metric, missing model/data source, no adapters, ...), before any
            actor starts.
        RuntimeError: if no actor could be started (the first actor's error is attached).
    """
    if num_actors == 0:
        return evaluate_in_process(
            base,
            adapters,
            dataset,
            metrics,
            adapters_glob=adapters_glob,
            sort_by=sort_by,
            descending=descending,
            output=output,
            progress=progress,
            **options,
        )
    if num_actors < 0 or max_retries < 0:
        raise ValueError(f"num_actors={num_actors} and max_retries={max_retries} must be >= 0")
    if num_gpus_per_actor and "device" not in options:
        options["device"] = "cuda"
    if "threads" not in options and num_cpus_per_actor >= 1:
        options["threads"] = int(num_cpus_per_actor)
    spec, refs, sort_by = prepare(base, adapters, dataset, metrics, adapters_glob, sort_by, output, options)
    try:
        import ray
    except ImportError as exc:
        raise ImportError(
            "evaluating on Ray actors needs ray: pip install 'dpeft[ray]', or pass num_actors=0 (--actors 0)"
        ) from exc

    started = not ray.is_initialized()
    if started:
        cpus = max(os.cpu_count() or 1, int(num_actors * num_cpus_per_actor + 0.999))
        # Connecting to an existing cluster takes no resource arguments; a local one gets enough CPUs for the pool.
        if address:
            ray.init(address=address)
        else:
            ray.init(num_cpus=cpus, include_dashboard=False)
    pool = None
    try:
        pool = _Pool(spec, num_actors, runtime_env, num_cpus_per_actor, num_gpus_per_actor, max_retries)
        rows = pool.run(refs, sort_by, progress)
    finally:
        if pool is not None:
            pool.close()
        if started:
            ray.shutdown()
    return finish(rows, sort_by, descending, output)


class _Pool:
    """The actors and the dispatch loop; an actor that dies is dropped and its adapters are queued again."""

    def __init__(self, spec, num_actors, runtime_env, num_cpus, num_gpus, max_retries) -> None:
        import ray

        options = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_restarts": 0, "max_task_retries": 0}
        if runtime_env:
            options["runtime_env"] = runtime_env
        remote = ray.remote(EvalWorker).options(**options)
        actors = [remote.remote(spec) for _ in range(num_actors)]
        self.actors, first_error = [], None
        for actor in actors:  # waiting here makes a base that cannot be built one clear error, not N failed rows
            try:
                ray.get(actor.ready.remote())
                self.actors.append(actor)
            except ray.exceptions.RayError as exc:
                first_error = first_error or exc
        if not self.actors:
            raise RuntimeError(f"no evaluation actor could start: {first_error}") from first_error
        self.max_retries = max_retries

    def close(self) -> None:
        """Stop the actors now (on a shared cluster they would otherwise hold their CPUs until collected)."""
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def run(self, refs: list[AdapterRef], sort_by: str | None, progress: bool) -> list[dict[str, Any]]:
        import ray

        queue = deque((ref, 1) for ref in refs)
        running: dict[Any, tuple[Any, AdapterRef, int]] = {}  # future -> (actor, ref, attempt)
        load = {id(a): 0 for a in self.actors}
        rows: list[dict[str, Any]] = []
        with progress_bar(len(refs), progress) as bar:
            while queue or running:
                for actor in list(self.actors):
                    while queue and load[id(actor)] < IN_FLIGHT_PER_ACTOR:
                        ref, attempt = queue.popleft()
                        running[actor.evaluate.remote(ref)] = (actor, ref, attempt)
                        load[id(actor)] += 1
                if not running:  # every actor died with adapters left
                    rows.extend(_failed(r, a, "no evaluation actor left (all died)") for r, a in queue)
                    queue.clear()
                    break
                [future], _ = ray.wait(list(running), num_returns=1)
                actor, ref, attempt = running.pop(future)
                load[id(actor)] -= 1
                try:
                    row = {**ray.get(future), "attempts": attempt}
                except ray.exceptions.RayActorError as exc:
                    if actor in self.actors:
                        self.actors.remove(actor)
                    if attempt <= self.max_retries:
                        queue.appendleft((ref, attempt + 1))  # the survivors take it next
                        continue
                    row = _failed(ref, attempt, f"its evaluation actor died {attempt} times: {exc}")
                except ray.exceptions.RayTaskError as exc:  # an error outside the evaluator's own handling
                    row = _failed(ref, attempt, str(exc))
                rows.append(row)
                advance(bar, rows, sort_by)
        return rows


def _failed(ref: AdapterRef, attempt: int, error: str) -> dict[str, Any]:
    return {
        "adapter": ref.name,
        "status": "error",
        "error": error,
        "method": "",
        "path": ref.path,
        "seconds": 0.0,
        "attempts": attempt,
    }
