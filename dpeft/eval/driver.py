"""The driver side of an evaluation, shared by the in-process loop and the Ray actor pool: checking the request,
the progress bar over adapters, and the sorted, written results table."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from tqdm.auto import tqdm

from dpeft.eval.evaluator import AdapterEvaluator, EvalSpec, MetricFn, make_spec
from dpeft.eval.sources import AdapterRef, expand_adapters
from dpeft.eval.table import sort_rows, write_table

Adapters = Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike] | str | os.PathLike | None


def prepare(
    base: Any,
    adapters: Adapters,
    dataset: Any,
    metrics: Any,
    adapters_glob: Sequence[str] | str,
    sort_by: str | None,
    output: str | os.PathLike | None,
    options: dict[str, Any],
) -> tuple[EvalSpec, list[AdapterRef], str | None]:
    """Check everything that can be checked before a model is built: (spec, adapter refs, sort column)."""
    spec = make_spec(base, dataset, metrics, **options)
    refs = expand_adapters(adapters, [adapters_glob] if isinstance(adapters_glob, str) else list(adapters_glob))
    names = spec.metric_names()
    if sort_by is None:
        sort_by = names[0] if names else None
    elif sort_by not in names and all(isinstance(m, str) for m in spec.metrics):
        raise ValueError(f"sort_by={sort_by!r} is not among the metrics {names}")
    if output is not None and os.path.splitext(os.fspath(output))[1].lower() not in (".csv", ".json", ".jsonl"):
        raise ValueError(f"output {os.fspath(output)!r}: use a .csv, .json or .jsonl name")
    return spec, refs, sort_by


def progress_bar(total: int, enabled: bool) -> tqdm:
    return tqdm(total=total, desc="adapters", unit="adapter", disable=not enabled, dynamic_ncols=True)


def advance(bar: tqdm, rows: list[dict[str, Any]], sort_by: str | None) -> None:
    """One more adapter done: move the bar and show the failures so far and the best row."""
    failed = sum(r["status"] != "ok" for r in rows)
    postfix = {"failed": failed}
    row = rows[-1]
    if sort_by and row["status"] == "ok" and isinstance(row.get(sort_by), float):
        postfix[sort_by] = f"{row[sort_by]:.4g}"
    bar.set_postfix(postfix, refresh=False)
    bar.update(1)


def finish(
    rows: list[dict[str, Any]], sort_by: str | None, descending: bool | None, output: str | os.PathLike | None
) -> list[dict[str, Any]]:
    """The sorted table, also written to `output` when given (unsorted if `sort_by` turns out to be unknown)."""
    try:
        rows = sort_rows(rows, sort_by, descending)
    except ValueError:
        if output is not None:
            write_table(rows, output)
        raise
    if output is not None:
        write_table(rows, output)
    return rows


def evaluate_in_process(
    base: Any,
    adapters: Adapters,
    dataset: Any,
    metrics: str | MetricFn | Sequence[str | MetricFn] = ("loss",),
    *,
    adapters_glob: Sequence[str] | str = (),
    sort_by: str | None = None,
    descending: bool | None = None,
    output: str | os.PathLike | None = None,
    progress: bool = True,
    **options: Any,
) -> list[dict[str, Any]]:
    """Evaluate adapters one after another on one base model in this process (no Ray).

    Takes the arguments of `dpeft.ray.evaluate_adapters` (without the pool's); see there. Returns the table rows.
    """
    spec, refs, sort_by = prepare(base, adapters, dataset, metrics, adapters_glob, sort_by, output, options)
    evaluator = AdapterEvaluator(spec)
    rows: list[dict[str, Any]] = []
    with progress_bar(len(refs), progress) as bar:
        for ref in refs:
            rows.append({**evaluator.evaluate(ref), "attempts": 1})
            advance(bar, rows, sort_by)
    return finish(rows, sort_by, descending, output)
