"""`dpeft train --config FILE [section.field=value ...]`: a thin shell over `dpeft.train.run`."""

from __future__ import annotations

import argparse


def _epilog() -> str:
    from dpeft.config.run_config import field_docs

    lines = ["run config fields (YAML sections; override any with section.field=value):"]
    for key, default, doc in field_docs():
        lines.append(f"  {key} (default {default})\n      {doc}")
    return "\n".join(lines)


def _train(args: argparse.Namespace) -> None:
    import yaml

    from dpeft.config.run_config import load_run_config
    from dpeft.dist import destroy_distributed
    from dpeft.train import run
    from dpeft.train.setup import validate

    try:  # a bad config is the user's to fix: one line, no traceback
        cfg = load_run_config(args.config, args.overrides)
        validate(cfg)
    except ValueError as exc:
        raise SystemExit(f"dpeft train: error: {exc}") from None
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return
    try:
        run(cfg)
    finally:
        destroy_distributed()


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="Train an adapter from a YAML run config (one process, torchrun or Ray).",
        description="Train an adapter as a YAML run config says. Runs unchanged in one process and under "
        "`torchrun --nproc_per_node=N -m dpeft.cli.main train ...` (see launch/torchrun.sh).",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML run config (default: the built-in defaults).")
    parser.add_argument("--print-config", action="store_true", help="Print the resolved config and exit.")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.field=value",
        help="Dotted overrides, values parsed as YAML (e.g. train.steps=20 peft.r=4).",
    )
    parser.set_defaults(func=_train)
