"""`emotion-monitor dashboard`: a live web board of the conversations the monitor is watching.

* :mod:`stream.dashboard.state`  - pure in-memory model of the board (no I/O), fed by the
  ``emotions``, ``emotion-alerts`` and ``conversation-summaries`` topics;
* :mod:`stream.dashboard.server` - aiohttp app (page, JSON snapshot, server-sent events) and the
  background Kafka consumer that feeds the state.

Everything the page needs is served from ``static/`` (no CDN, no external fonts, no build step).
"""

from __future__ import annotations

import argparse

from stream.dashboard.state import BoardState

__all__ = ["BoardState", "add_dashboard", "run_dashboard", "run_dashboard_cmd"]


def __getattr__(name):  # aiohttp/aiokafka (~0.2 s) are imported only when the server is wanted
    if name in {"run_dashboard", "DashboardServer"}:
        from stream.dashboard import server

        return getattr(server, name)
    raise AttributeError(name)


# The CLI side lives here, not in server.py, so that `emotion-monitor --help` does not import aiohttp.
def add_dashboard(sub) -> None:
    """`emotion-monitor dashboard` (wired into stream/cli.py by its owner)."""
    p = sub.add_parser(
        "dashboard", help="serve the live web dashboard (conversations by risk, timelines, alerts, summaries)",
        description="Serve a live web board fed by the emotions, emotion-alerts and conversation-summaries "
        "topics: active conversations sorted by risk, each one's per-utterance emotion timeline (provisional "
        "verdicts hatched, final ones solid), the alerts feed and the summaries of ended conversations. "
        "Broker and topics come from the environment (EMOTION_MONITOR_*; `emotion-monitor settings`). "
        "No authentication: it binds 127.0.0.1 unless told otherwise.",
    )
    p.add_argument("--host", default=None,
                   help="bind address (default: EMOTION_MONITOR_DASHBOARD_HOST, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None,
                   help="HTTP port, 0 = any free port (default: EMOTION_MONITOR_DASHBOARD_PORT, 8088)")
    p.add_argument("--bootstrap", default=None,
                   help="Kafka host:port list (default: from EMOTION_MONITOR_BROKERS)")
    p.set_defaults(func=run_dashboard_cmd)


def run_dashboard_cmd(args: argparse.Namespace) -> int:
    import asyncio

    from stream.dashboard.server import run_dashboard
    from stream.kafka import bootstrap_servers
    from stream.settings import Settings

    overrides = {}
    if getattr(args, "bootstrap", None):
        overrides["brokers"] = ",".join(f"kafka://{b}" for b in bootstrap_servers(args.bootstrap).split(","))
    settings = Settings(**overrides)
    if args.port is not None and not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be 0..65535, got {args.port}")
    try:
        asyncio.run(run_dashboard(settings, host=args.host, port=args.port))
    except KeyboardInterrupt:
        pass  # Ctrl-C is the normal way to stop it
    return 0
