"""The summary event of a conversation that ended, from its monitor state (pure)."""

from __future__ import annotations

from typing import Any

from stream.core.events import model_field, summary_id
from stream.core.monitor import MonitorState
from stream.core.risk import risk_score

ENDED_BY = ("end", "abandoned", "idle")


def monitor_risk(state: MonitorState) -> float:
    """The conversation's risk (stream.core.risk) from what the monitor keeps per group."""
    shares = [sum(g.negative) / len(g.negative) for g in state.groups if g.negative]
    return risk_score(shares, [a.severity for g in state.groups for a in g.open])


def summarize(state: MonitorState, conversation_id: str, ended_by: str, model_id: str, now: float) -> dict[str, Any]:
    """The summary event of a conversation that ended (`ended_by`: "end" message, or "abandoned":
    no utterance for the abandonment timeout; "idle" is what releases before it wrote for an idle
    timeout, which now only flushes)."""
    if ended_by not in ENDED_BY:
        raise ValueError(f"ended_by must be one of {', '.join(ENDED_BY)}, got {ended_by!r}")
    return {
        "summary_id": summary_id(model_id, conversation_id),
        "conversation_id": conversation_id,
        "ended_by": ended_by,
        "utterances": state.final_count,
        "distribution": {k: dict(c) for k, c in state.distribution},
        "trajectory": [f.to_dict() for f in state.trajectory.finals()],
        "trajectory_truncated": state.trajectory_truncated,
        "peaks": [f.to_dict() for f in state.peaks],
        "alerts": [a.to_dict() for a in state.alerts],
        "alerts_truncated": state.alerts_truncated,
        "open_alerts": [a.alert_id for g in state.groups for a in g.open],
        "risk": monitor_risk(state),
        "model": model_field(model_id),
        "ts_emitted": now,
    }
