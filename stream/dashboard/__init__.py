"""`emotion-monitor dashboard`: a live web board of the conversations the monitor is watching.

* :mod:`stream.dashboard.state`  - pure in-memory model of the board (no I/O), fed by the
  ``emotions``, ``emotion-alerts`` and ``conversation-summaries`` topics;
* :mod:`stream.dashboard.server` - aiohttp app (page, JSON snapshot, server-sent events) and the
  background Kafka consumer that feeds the state.

Everything the page needs is served from ``static/`` (no CDN, no external fonts, no build step).
"""

from stream.dashboard.state import BoardState, NEGATIVE_EMOTIONS

__all__ = ["BoardState", "NEGATIVE_EMOTIONS", "add_dashboard", "run_dashboard", "run_dashboard_cmd"]


def __getattr__(name):  # aiohttp/aiokafka are imported only when the server is wanted
    if name in {"add_dashboard", "run_dashboard", "run_dashboard_cmd", "DashboardServer"}:
        from stream.dashboard import server

        return getattr(server, name)
    raise AttributeError(name)
