"""The `dpeft` command: thin shells over library functions, one module per subcommand."""

from __future__ import annotations

import argparse
import importlib

# Subcommand modules, each with `add_parser(subparsers)`; imported lazily so `dpeft --help` stays fast.
SUBCOMMANDS = ["demo", "eval", "export", "merge", "train"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpeft", description="Distributed-first parameter-efficient fine-tuning.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"dpeft.cli.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
