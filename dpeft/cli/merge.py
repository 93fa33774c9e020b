"""`dpeft merge`: fold adapters into a sharded HF safetensors checkpoint (a thin shell over `merge_checkpoint`).

Run it as one process, or under torchrun to split the output shards across ranks (see launch/merge_torchrun.sh).
"""

from __future__ import annotations

import argparse
import os


def run(args: argparse.Namespace) -> None:
    from dpeft.checkpoint import merge_checkpoint
    from dpeft.dist import destroy_distributed, init_distributed, is_main_process

    if args.weights is not None and len(args.weights) != len(args.adapter):
        raise SystemExit(f"dpeft merge: got {len(args.weights)} --weights for {len(args.adapter)} --adapter")
    distributed = "WORLD_SIZE" in os.environ and not args.dry_run
    if distributed:
        init_distributed("cpu")  # gloo: the ranks only vote and wait on each other; the work is file I/O
    try:
        report = merge_checkpoint(
            args.base,
            args.adapter,
            args.out,
            weights=args.weights,
            shard_size=args.shard_size,
            merge_dtype=args.dtype,
            dry_run=args.dry_run,
            overwrite=args.overwrite,
            ignore_name_mismatch=args.ignore_name_mismatch,
            safe_merge=args.safe_merge,
            progress=not args.no_progress,
        )
    except ValueError as exc:
        raise SystemExit(f"dpeft merge: {exc}") from None
    finally:
        if distributed:
            destroy_distributed()
    if args.dry_run:
        print(report.describe())
        print("dry run: nothing was written")
    elif is_main_process():
        mb = report.total_bytes / 1e6
        print(
            f"merged {len(report.changed)} tensors into {report.out_dir} ({len(report.shards)} file(s), "
            f"{mb:.1f} MB) in {report.seconds:.1f}s"
        )


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="Merge adapters into a sharded safetensors base checkpoint.",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--base", required=True, help="HF model folder: config.json + model(-*).safetensors.")
    parser.add_argument(
        "--adapter",
        required=True,
        action="append",
        help="PEFT-format adapter folder or dpeft distributed-checkpoint step; repeat to merge several, in order.",
    )
    parser.add_argument(
        "--weights",
        type=float,
        nargs="+",
        default=None,
        help="One weight per adapter scaling the change it makes (default 1 each).",
    )
    parser.add_argument("--out", required=True, help="Output folder; published only when complete.")
    parser.add_argument("--shard-size", default="5GB", help="Largest output file, e.g. 2GB or 500MiB.")
    parser.add_argument(
        "--dtype",
        choices=["keep", "float32"],
        default="keep",
        help="Compute in the base dtype (keep) or upcast to float32 for the merge; the output keeps the base dtype.",
    )
    parser.add_argument("--dry-run", action="store_true", help="List the tensors that would change; write nothing.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing output folder.")
    parser.add_argument(
        "--ignore-name-mismatch",
        action="store_true",
        help="Merge even if an adapter's base_model_name_or_path names another folder.",
    )
    parser.add_argument(
        "--safe-merge",
        action="store_true",
        help="Check every merged tensor for NaN/inf and stop (publishing nothing) if one has any.",
    )
    parser.add_argument("--no-progress", action="store_true", help="No progress bar.")
    parser.set_defaults(func=run)
