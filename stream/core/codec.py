"""The one codec for conversation state bytes: what the worker stores in Redis per conversation.

Layout: a JSON header (one line: JSON escapes newlines in strings, so the first b"\\n" ends it), then
the model's own dialogue state bytes (`model.streaming.DialogueState.to_bytes`, the model
package's format). The header's first field is the fencing `version`: the state store's Lua script
reads it with a pattern.

The JSON keys are the stored format and outlive Python names: a rolling upgrade has old and new
workers read each other's states, so a renamed field keeps its key (`awaiting_final` is stored as
"pending", `MonitorState.final_count` as "utterances", `Group.last_finals` as "window", the
trajectory's columns as "seq", "score", "who", "emotion", "people", "emotions"). States written
before a field existed are read with its default.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson

from model.streaming import DialogueState
from stream.core.conversation import ConversationState, Held, UttMeta
from stream.core.events import dump_json
from stream.core.monitor import AlertRef, Group, MonitorState
from stream.core.trajectory import Final, Trajectory

MONITOR_VERSION = 2  # 2: packed trajectory (1 is still read)


def encode_state(state: ConversationState, model_format: int = 2) -> bytes:
    """The stored bytes of `state`; `model_format` is that of its model part (DialogueState.to_bytes:
    2 compact, 1 the first format, which workers before the compact one can read)."""
    header = {
        "version": state.version,  # first: the store's Lua script reads it with a pattern
        "partition": state.partition,
        "last_seq": state.last_seq,
        "ended": state.ended,
        "context_reset": state.context_reset,
        "last_activity": state.last_activity,
        "last_event_ts": state.last_event_ts,
        "ended_by": state.ended_by,
        "model_id": state.model_id,
        "labels": list(state.labels) if state.labels is not None else None,
        "pending": {str(p): vars(m) for p, m in state.awaiting_final.items()},
        "recent": {str(s): d for s, d in state.recent.items()},
        "held": {str(q): _held_to_dict(h) for q, h in state.held.items()},
        "skipped": list(state.skipped),
        "monitor": monitor_to_dict(state.monitor),
    }
    # The header and the model's bytes in one copy (to_bytes writes its prefix in place).
    return state.dialogue.to_bytes(version=model_format, prefix=dump_json(header) + b"\n")


def decode_state(data: bytes) -> ConversationState:
    """The state stored as `data` (any layout this project ever wrote). Its model arrays are
    read-only views of `data` (no copy)."""
    end = data.index(b"\n")
    h = orjson.loads(data[:end])
    return ConversationState(
        dialogue=dialogue_of(data, end),
        last_seq=h["last_seq"],
        ended=h["ended"],
        context_reset=h["context_reset"],
        last_activity=h["last_activity"],
        # states written before these fields existed
        last_event_ts=h.get("last_event_ts", h["last_activity"]),
        ended_by=h.get("ended_by", "end" if h["ended"] else None),
        awaiting_final={int(p): UttMeta(**m) for p, m in h["pending"].items()},
        recent={int(s): d for s, d in h["recent"].items()},
        monitor=monitor_from_dict(h["monitor"]),
        model_id=h.get("model_id"),
        labels=tuple(h["labels"]) if h.get("labels") is not None else None,
        held={int(q): _held_from_dict(d) for q, d in h.get("held", {}).items()},
        skipped=tuple(h.get("skipped", ())),
        version=h.get("version", 0),
        partition=h.get("partition"),
    )


def dialogue_of(data: bytes, end: int | None = None) -> DialogueState:
    """The model's part of stored state bytes (after the header line), as read-only views of
    `data`; `end` is the header line's length when the caller knows it."""
    end = data.index(b"\n") if end is None else end
    return DialogueState.from_bytes(memoryview(data)[end + 1:])


def _held_to_dict(h: Held) -> dict[str, Any]:
    return {"meta": vars(h.meta), "digest": h.digest, "event_ts": h.event_ts, "vector": base64.b64encode(h.vector_bytes).decode()}


def _held_from_dict(d: dict[str, Any]) -> Held:
    return Held(UttMeta(**d["meta"]), d["digest"], d["event_ts"], base64.b64decode(d["vector"]))


# ---- the monitor's part -------------------------------------------------------------------------

def monitor_to_dict(m: MonitorState) -> dict[str, Any]:
    return {
        "v": MONITOR_VERSION,
        "last_seq": m.last_seq,
        "utterances": m.final_count,
        "groups": [_group_to_dict(g) for g in m.groups],
        "distribution": {k: dict(c) for k, c in m.distribution},
        "trajectory": trajectory_to_dict(m.trajectory),
        "trajectory_truncated": m.trajectory_truncated,
        "peaks": [f.to_dict() for f in m.peaks],
        "alerts": [a.to_dict() for a in m.alerts],
        "alerts_truncated": m.alerts_truncated,
    }


def monitor_from_dict(d: dict[str, Any]) -> MonitorState:
    if d.get("v") not in (1, MONITOR_VERSION):
        raise ValueError(f"unsupported MonitorState version {d.get('v')!r} (expected {MONITOR_VERSION})")
    return MonitorState(
        last_seq=int(d["last_seq"]),
        final_count=int(d["utterances"]),
        groups=tuple(_group_from_dict(g) for g in d["groups"]),
        distribution=tuple((k, tuple((e, int(n)) for e, n in c.items())) for k, c in d["distribution"].items()),
        trajectory=trajectory_from_dict(d["trajectory"]),
        trajectory_truncated=bool(d["trajectory_truncated"]),
        peaks=tuple(_final_from_dict(f) for f in d["peaks"]),
        alerts=tuple(_alert_from_dict(a) for a in d["alerts"]),
        alerts_truncated=bool(d["alerts_truncated"]),
    )


def _group_to_dict(g: Group) -> dict[str, Any]:
    return {"key": g.key, "role": g.role, "speaker": g.speaker, "count": g.count, "last_seq": g.last_seq,
            "window": [f.to_dict() for f in g.last_finals], "negative": list(g.negative),
            "last_raised": dict(g.last_raised), "calm": {n: [run, since] for n, run, since in g.calm},
            "open": [{**a.to_dict(), "speaker": a.speaker} for a in g.open]}


def _group_from_dict(d: dict[str, Any]) -> Group:
    return Group(key=d["key"], role=d["role"], speaker=d["speaker"], count=int(d["count"]), last_seq=int(d["last_seq"]),
                 last_finals=tuple(_final_from_dict(f) for f in d["window"]),
                 negative=tuple(bool(x) for x in d["negative"]),
                 last_raised=tuple((n, int(c)) for n, c in d["last_raised"].items()),
                 calm=tuple((n, int(v[0]), int(v[1])) for n, v in d["calm"].items()),
                 open=tuple(_alert_from_dict(a) for a in d["open"]))


def _alert_from_dict(d: dict[str, Any]) -> AlertRef:
    return AlertRef(d["alert_id"], d["rule"], d["kind"], d["severity"], int(d["seq_from"]), int(d["seq_to"]),
                    d.get("speaker", ""))


def _final_from_dict(d: dict[str, Any]) -> Final:
    return Final(int(d["seq"]), d["role"], d["speaker"], d["emotion"], float(d["score"]))


def trajectory_to_dict(t: Trajectory) -> dict[str, Any]:
    b64 = base64.b64encode
    return {"seq": b64(t.seqs).decode(), "score": b64(t.scores).decode(), "who": b64(t.who_ids).decode(),
            "emotion": b64(t.emotion_ids).decode(), "people": [list(p) for p in t.who_table],
            "emotions": list(t.emotion_table)}


def trajectory_from_dict(d: dict[str, Any] | list) -> Trajectory:
    if isinstance(d, list):  # monitor version 1: a list of finals
        return Trajectory.of(_final_from_dict(f) for f in d)
    b64 = base64.b64decode
    return Trajectory(b64(d["seq"]), b64(d["score"]), b64(d["who"]), b64(d["emotion"]),
                      tuple((r, s) for r, s in d["people"]), tuple(d["emotions"]))
