#!/usr/bin/env python
"""Train a dpeft run config on a Ray cluster: every Ray Train worker runs the same `dpeft.train.run(cfg)`.

Examples:
    python launch/ray_train.py --config configs/tiny_llama.yaml --num-workers 2
    python launch/ray_train.py --config configs/tiny_llama.yaml --num-workers 2 train.steps=50 checkpoint.every=10
    python launch/ray_train.py --config configs/smollm2_qa.yaml --address auto --num-workers 8 --use-gpu \\
        --storage-path /shared/ray_results --max-failures 3 --runtime-env '{"pip": ["dpeft[ray]"]}'

Without --address a local Ray cluster is started for the job (and stopped after it). Checkpoints land in
<storage-path>/<name>/step-XXXXXXXX (dpeft checkpoints: `dpeft export` reads them); the final adapter and
metrics.jsonl in the config's output.dir. For several nodes, output.dir, checkpoint.dir and --storage-path must
be on storage all nodes share.
"""

from __future__ import annotations

import argparse
import json
import sys


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="launch/ray_train.py",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML run config (default: the built-in defaults).")
    parser.add_argument("--num-workers", type=int, default=2, help="Ray Train workers (data-parallel ranks).")
    parser.add_argument("--address", default=None, help="Existing Ray cluster ('auto', 'ray://head:10001').")
    parser.add_argument("--use-gpu", action="store_true", help="One GPU per worker, nccl.")
    parser.add_argument("--cpus-per-worker", type=float, default=None, help="CPUs reserved for each worker.")
    parser.add_argument("--storage-path", default=None, help="Ray's results/checkpoints (default output.dir/ray).")
    parser.add_argument("--name", default="dpeft-train", help="Ray run name (a rerun with the same name resumes).")
    parser.add_argument("--max-failures", type=int, default=0, help="Worker-group restarts after failures.")
    parser.add_argument("--runtime-env", default=None, help="Ray runtime_env as JSON, e.g. '{\"pip\": [...]}'.")
    parser.add_argument(
        "overrides", nargs="*", metavar="section.field=value", help="Dotted run-config overrides (YAML values)."
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from dpeft.ray import train

    try:
        runtime_env = json.loads(args.runtime_env) if args.runtime_env else None
    except json.JSONDecodeError as exc:
        raise SystemExit(f"ray_train.py: error: --runtime-env is not JSON: {exc}") from None
    resources = {"CPU": args.cpus_per_worker} if args.cpus_per_worker is not None else None
    try:
        result = train(
            args.config,
            args.overrides,
            num_workers=args.num_workers,
            resources_per_worker=resources,
            use_gpu=args.use_gpu,
            address=args.address,
            runtime_env=runtime_env,
            storage_path=args.storage_path,
            name=args.name,
            max_failures=args.max_failures,
        )
    except ValueError as exc:  # a config that cannot run: the user's to fix, one line
        raise SystemExit(f"ray_train.py: error: {exc}") from None
    print(json.dumps({"metrics": result.metrics, "checkpoint": getattr(result.checkpoint, "path", None)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
