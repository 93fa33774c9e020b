"""`dpeft export CKPT OUT`: a distributed checkpoint (any world size) to PEFT's format."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a distributed checkpoint as PEFT-format adapters",
        description="Write the adapters of a distributed checkpoint (saved at any world size) in PEFT's format: "
        "adapter_config.json + adapter_model.safetensors, the default adapter in OUT and others in OUT/<name>.",
    )
    parser.add_argument(
        "checkpoint",
        metavar="CKPT",
        help="a step-XXXXXXXX directory, or a checkpoint root (its newest complete step is used)",
    )
    parser.add_argument("out", metavar="OUT", help="output directory")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    from dpeft.checkpoint.export import export_checkpoint

    try:
        path = export_checkpoint(args.checkpoint, args.out)
    except ValueError as exc:
        raise SystemExit(f"dpeft export: {exc}") from exc
    print(f"exported {path} -> {args.out}")
