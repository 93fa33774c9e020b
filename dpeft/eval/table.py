"""The results table: one row per adapter, sorted by a metric, written as CSV or JSON."""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any

from dpeft.eval.evaluator import BUILTIN_METRICS

# Lower is better for these; for accuracy and user metrics higher is better unless the caller says otherwise.
LOWER_IS_BETTER = ("loss", "perplexity")
_LEADING = ("adapter", "status")
_TRAILING = ("method", "seconds", "attempts", "error", "path")


def sort_rows(rows: list[dict[str, Any]], sort_by: str | None, descending: bool | None = None) -> list[dict[str, Any]]:
    """Rows that succeeded, best first by `sort_by`, then the failed ones by name.

    Args:
        rows: Result rows (``status`` 'ok' or 'error').
        sort_by: A metric column; None keeps the input order.
        descending: Higher first; None = ascending for loss/perplexity, descending otherwise.

    Raises:
        ValueError: if `sort_by` is not a column of the successful rows.
    """
    ok = [r for r in rows if r["status"] == "ok"]
    failed = sorted((r for r in rows if r["status"] != "ok"), key=lambda r: r["adapter"])
    if sort_by is None:
        return ok + failed
    if ok and any(sort_by not in r for r in ok):
        columns = sorted({k for r in ok for k in r} - set(_LEADING) - set(_TRAILING) - {"traceback"})
        raise ValueError(f"sort_by={sort_by!r} is not a metric of the results; metrics: {columns}")
    if descending is None:
        descending = sort_by not in LOWER_IS_BETTER
    sign = -1.0 if descending else 1.0
    # NaN metrics (a diverged adapter) go last among the successful rows.
    ok.sort(key=lambda r: (math.isnan(r[sort_by]), sign * r[sort_by], r["adapter"]))
    return ok + failed


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """Column order: name and status, the metrics (built-in ones first), then method, timing, error, path."""
    present = {k for r in rows for k in r if k != "traceback"}
    metrics = [m for m in BUILTIN_METRICS if m in present]
    metrics += sorted(present - set(metrics) - set(_LEADING) - set(_TRAILING))
    return [c for c in _LEADING if c in present] + metrics + [c for c in _TRAILING if c in present]


def write_table(rows: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Write `rows` as CSV (``.csv``) or JSON (``.json``: a list of objects; ``.jsonl``: one object per line).

    Raises:
        ValueError: for another extension.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".csv", ".json", ".jsonl"):
        raise ValueError(f"results file {path!r}: use a .csv, .json or .jsonl name")
    cols = columns(rows)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        if ext == ".csv":
            writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        elif ext == ".json":
            json.dump([{c: r.get(c) for c in cols} for r in rows], f, indent=1)
        else:
            f.writelines(json.dumps({c: r.get(c) for c in cols}) + "\n" for r in rows)
    os.replace(tmp, path)  # a reader never sees a half-written table
