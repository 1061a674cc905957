"""`emotion-monitor`: one command line for the model and the stream side.

Heavy imports (torch, faust) happen inside each subcommand, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import sys

from model import cli as model_cli
from stream.tools.bench import add_bench
from stream.dashboard import add_dashboard
from stream.tools.demo import add_demo
from stream.tools.replay import add_replay
from stream.tools.soak import add_soak
from stream.tools.watch import add_watch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emotion-monitor",
        description="Streaming dialogue emotion monitor: train and evaluate the multi-task emotion + "
        "speaker-identification model, and run it over Kafka.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model_cli.add_train(sub)
    model_cli.add_evaluate(sub)
    model_cli.add_soup(sub)
    model_cli.add_export(sub)
    model_cli.add_calibrate(sub)
    model_cli.add_data(sub)
    add_replay(sub)
    add_watch(sub)
    add_demo(sub)
    add_bench(sub)
    add_soak(sub)
    add_dashboard(sub)
    p = sub.add_parser(
        "worker",
        help="run the streaming worker (faust) over Kafka and Redis",
        description="Consume `utterances`, publish emotion events to `emotions` and bad input to `utterances-dlq`, "
        "keeping each conversation's state in Redis. Configured from the environment "
        "(EMOTION_MONITOR_*; `emotion-monitor settings` lists them).",
    )
    p.set_defaults(func=run_worker_cmd)
    p = sub.add_parser("settings", help="list the settings (environment variables), their defaults and current values")
    p.set_defaults(func=run_settings_cmd)
    return parser


def run_worker_cmd(args: argparse.Namespace) -> int:
    import os

    from stream.settings import Settings

    settings = Settings()
    # Read by the OpenMP runtime when torch loads: set before anything imports torch.
    os.environ.setdefault("OMP_WAIT_POLICY", settings.omp_wait_policy)
    from stream.worker.run import run_worker

    # faust's Worker parses sys.argv itself: leave it only the program name.
    sys.argv = sys.argv[:1]
    run_worker(settings)
    return 0


def run_settings_cmd(args: argparse.Namespace) -> int:
    from stream.settings import Settings

    current = Settings()
    for name, field in Settings.model_fields.items():
        value = getattr(current, name)
        shown = "********" if "password" in name and value is not None else value
        print(f"EMOTION_MONITOR_{name.upper():<24} {str(shown):<40} {field.description or ''}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValidationError as exc:  # a bad EMOTION_MONITOR_* value: name the variable
        for err in exc.errors():
            name = "EMOTION_MONITOR_" + "_".join(str(x) for x in err["loc"]).upper()
            shown = "****" if "PASSWORD" in name else repr(err.get("input"))  # never echo a secret
            print(f"emotion-monitor {args.command}: {name}={shown}: {err['msg']}", file=sys.stderr)
        print("see `emotion-monitor settings` and README.md, 'Settings'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except (FileNotFoundError, ValueError, RuntimeError, TimeoutError) as exc:
        print(f"emotion-monitor {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
