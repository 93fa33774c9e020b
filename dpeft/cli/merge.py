"""`dpeft merge`: fold adapters into a sharded HF safetensors checkpoint (a thin shell over `merge_checkpoint`).

Run it as one process, under torchrun to split the output shards across ranks (see launch/merge_torchrun.sh), or
as a Ray job with --ray-workers N (workers of the local Ray cluster, or of the one --ray-address names).
"""

from __future__ import annotations

import argparse
import os


def run(args: argparse.Namespace) -> None:
    from dpeft.checkpoint import merge_checkpoint
    from dpeft.dist import destroy_distributed, init_distributed, is_main_process

    if args.weights is not None and len(args.weights) != len(args.adapter):
        raise SystemExit(f"dpeft merge: got {len(args.weights)} --weights for {len(args.adapter)} --adapter")
    options = dict(
        weights=args.weights,
        shard_size=args.shard_size,
        merge_dtype=args.dtype,
        overwrite=args.overwrite,
        ignore_name_mismatch=args.ignore_name_mismatch,
        safe_merge=args.safe_merge,
        progress=not args.no_progress,
    )
    use_ray = args.ray_workers is not None and not args.dry_run
    distributed = "WORLD_SIZE" in os.environ and not args.dry_run and not use_ray
    if distributed:
        init_distributed("cpu")  # gloo: the ranks only vote and wait on each other; the work is file I/O
    try:
        if use_ray:
            from dpeft.ray.merge import merge

            report = merge(
                args.base, args.adapter, args.out, num_workers=args.ray_workers, address=args.ray_address, **options
            )
        else:
            report = merge_checkpoint(args.base, args.adapter, args.out, dry_run=args.dry_run, **options)
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
        help="PEFT-format adapter folder, dpeft checkpoint step, or checkpoint root (its newest step); repeatable.",
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
    parser.add_argument(
        "--ray-workers", type=int, default=None, help="Run as a Ray job on this many workers (output shards split)."
    )
    parser.add_argument(
        "--ray-address", default=None, help="Ray cluster to use with --ray-workers (e.g. auto); default: a local one."
    )
    parser.set_defaults(func=run)
