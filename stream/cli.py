"""`emotion-monitor`: one command line for the model and the stream side.

Heavy imports (torch, faust) happen inside each subcommand, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import sys

from model import cli as model_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emotion-monitor",
        description="Streaming dialogue emotion monitor: train and evaluate the multi-task emotion + "
        "speaker-identification model, and run it over Kafka.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model_cli.add_train(sub)
    model_cli.add_evaluate(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"emotion-monitor {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
