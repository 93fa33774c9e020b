"""`dpeft eval`: many adapters against one base model, on Ray actors or in this process; a thin shell over
`dpeft.ray.evaluate_adapters`."""

from __future__ import annotations

import argparse

EPILOG = """examples:
  dpeft eval --base tiny-llama --data hamlet --adapters runs/a/adapter runs/b/checkpoints --out results.csv
  dpeft eval --config configs/quickstart.yaml --adapters-glob 'sweep/*/adapter' --metric accuracy,loss --actors 4
  dpeft eval --base all-minilm-l6-v2 --task seq_cls --data rotten_tomatoes data.limit=500 --adapters A B --actors 0

The base model and the data are the `model` and `data` sections of a run config (--config, then --base/--task/
--data and dotted overrides such as model.dtype=bfloat16 or data.max_length=256); with the config of the training
run and --split validation, adapters are evaluated on that run's held-out split. --adapters takes every word
after it up to the next option, so put dotted overrides before it (or after another option).
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="Evaluate many adapters against one base model (Ray actors or in process) into a results table.",
        description="Evaluate adapters (PEFT-format folders or dpeft distributed checkpoints, any method, mixed) "
        "on one base model and dataset. Each Ray actor loads the base once and swaps adapters through the store. "
        "A corrupt or incompatible adapter is reported in the table with its error; the others go on.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        default=None,
        help="YAML run config whose model/data sections (and train.seed) are used (default: the built-in defaults).",
    )
    parser.add_argument(
        "--base", default=None, help="model.source: a local HF folder, a packaged model or tiny-llama."
    )
    parser.add_argument("--task", choices=["causal_lm", "seq_cls"], default=None, help="model.task.")
    parser.add_argument("--data", default=None, help="data.source: a packaged dataset or a .jsonl/.csv/.txt file.")
    parser.add_argument(
        "--adapters",
        nargs="+",
        default=[],
        metavar="DIR",
        help="PEFT-format adapter folders, checkpoint step directories or checkpoint roots.",
    )
    parser.add_argument(
        "--adapters-glob",
        action="append",
        default=[],
        metavar="PATTERN",
        help="Glob of adapter folders (quote it; may be repeated).",
    )
    parser.add_argument(
        "--metric",
        default="loss",
        help="Comma-separated metrics: loss, perplexity, accuracy (seq_cls). Default: loss.",
    )
    parser.add_argument("--sort-by", default=None, help="Metric to sort by (default: the first of --metric).")
    parser.add_argument(
        "--descending",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Sort highest first (default: lowest first for loss/perplexity, else highest first).",
    )
    parser.add_argument(
        "--split",
        choices=["all", "validation", "train"],
        default="all",
        help="Which examples: all, or the validation/train split `dpeft train` makes (same seed).",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="Examples per forward.")
    parser.add_argument("--actors", type=int, default=2, help="Ray actors (0 = evaluate in this process, no Ray).")
    parser.add_argument("--cpus-per-actor", type=float, default=1, help="CPUs each actor reserves.")
    parser.add_argument("--gpus-per-actor", type=float, default=0, help="GPUs each actor reserves.")
    parser.add_argument("--address", default=None, help="Address of an existing Ray cluster (default: start one).")
    parser.add_argument("--out", default=None, help="Write the table here (.csv, .json or .jsonl).")
    parser.add_argument("--no-progress", action="store_true", help="No progress bar.")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.field=value",
        help="Dotted overrides of the model/data sections, values parsed as YAML.",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    from dpeft.config.run_config import load_run_config

    try:
        cfg = load_run_config(args.config, args.overrides)
        if args.base is not None:
            cfg.model.source = args.base
        if args.task is not None:
            cfg.model.task = args.task
        if args.data is not None:
            cfg.data.source = args.data
        rows = _evaluate(args, cfg)
    except ValueError as exc:
        raise SystemExit(f"dpeft eval: error: {exc}") from None
    _print_summary(rows, args.out)


def _evaluate(args: argparse.Namespace, cfg) -> list[dict]:
    from dpeft.ray import evaluate_adapters

    return evaluate_adapters(
        cfg.model,
        args.adapters,
        cfg.data,
        [m.strip() for m in args.metric.split(",") if m.strip()],
        num_actors=args.actors,
        address=args.address,
        sort_by=args.sort_by,
        descending=args.descending,
        output=args.out,
        progress=not args.no_progress,
        adapters_glob=args.adapters_glob,
        num_cpus_per_actor=args.cpus_per_actor,
        num_gpus_per_actor=args.gpus_per_actor,
        split=args.split,
        batch_size=args.batch_size,
        seed=cfg.train.seed,
        device=cfg.train.device,
    )


def _print_summary(rows: list[dict], out: str | None, top: int = 10) -> None:
    from dpeft.eval.table import columns

    cols = [c for c in columns(rows) if c not in ("path", "error", "attempts")]
    print("  ".join(cols))
    for row in rows[:top]:
        print("  ".join(f"{row[c]:.4f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in cols))
    if len(rows) > top:
        print(f"... {len(rows) - top} more")
    failed = [r for r in rows if r["status"] != "ok"]
    for row in failed:
        print(f"failed: {row['adapter']}: {row['error']}")
    where = f"; table written to {out}" if out else ""
    print(f"{len(rows)} adapters evaluated, {len(failed)} failed{where}")
