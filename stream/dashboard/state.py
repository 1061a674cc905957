"""The dashboard's board, as a pure in-memory model (no I/O, no clock of its own unless given).

Fed by the three output topics of the monitor:

* ``emotions`` - per utterance one ``provisional`` event, maybe ``revised`` ones, exactly one
  ``final``; the board keeps, per conversation and seq, the latest verdict, and never lets an
  earlier status (a redelivered provisional) overwrite a final one;
* ``emotion-alerts`` - ``raised``/``recovered`` rule hits: a feed (most recent first, bounded) and,
  per conversation, the alerts still open (raised and not yet recovered, per rule and role/speaker);
* ``conversation-summaries`` - one per ended conversation: the conversation moves from the active
  list to a bounded "recently ended" list, with its summary.

Each ``apply_*`` method returns a list of *deltas* (small JSON-able dicts) that the server forwards
to the browsers over server-sent events; :meth:`BoardState.snapshot` gives the whole board.

Risk is the core's formula over the alert rules file (stream.core.risk), the same that gives the
summaries their `risk`: a board reads the rules for the labels its events carry (their `scores`
keys; `EMOTION_MONITOR_RULES_PATH` when set), so its ranking agrees with the monitor's alerts.

Memory is bounded: at most ``max_conversations`` active conversations (the least recently active
one is evicted when a new one arrives), ``max_utterances`` cells per conversation (oldest seqs
dropped), ``max_alerts`` in the feed, ``max_alerts_per_conversation`` and ``max_ended`` ended ones.

Topic data is untrusted: malformed events are counted and skipped, never raised; every string is
rendered by the page as text, never as markup.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from stream.core.risk import negative_emotions, negative_shares, risk_score
from stream.core.rules import Rule, default_rules_path, load_rules

STATUS_RANK = {"provisional": 0, "revised": 1, "final": 2}
SEVERITY_RANK = {"info": 1, "warning": 2, "critical": 3}
ELEVATED_SHARE = 0.4  # a negative share from which a conversation without open alerts is "elevated"


def _str(value: Any, limit: int = 200) -> str | None:
    if value is None:
        return None
    s = "".join(ch for ch in str(value) if ch.isprintable())
    return s[:limit]


def _num(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if f == f and f not in (float("inf"), float("-inf")) else None


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _clean_model(value: Any) -> dict | None:
    if isinstance(value, dict):
        return {"name": _str(value.get("name"), 64), "version": _str(value.get("version"), 64)}
    return None


@dataclass
class Cell:
    seq: int
    speaker: str | None
    role: str | None
    emotion: str
    score: float | None
    status: str
    ts_emitted: float | None  # of the event that set it

    def to_json(self) -> dict:
        return {"seq": self.seq, "speaker": self.speaker, "role": self.role, "emotion": self.emotion,
                "score": self.score, "status": self.status, "ts": self.ts_emitted}


@dataclass
class BoardConversation:
    """One conversation as the board shows it (the worker's state is stream.core.conversation's)."""

    conversation_id: str
    first_seen: float
    last_seen: float
    cells: dict[int, Cell] = field(default_factory=dict)
    alerts: deque = field(default_factory=deque)            # most recent first
    open_alerts: dict[str, dict] = field(default_factory=dict)  # alert_id -> raised alert not yet recovered
    summary: dict | None = None
    ended_by: str | None = None
    ended_at: float | None = None
    model: dict | None = None
    last_updated_seq: int | None = None   # seq of the most recently *updated* cell
    dropped_cells: int = 0
    rules: tuple[Rule, ...] = ()  # the alert rules for this conversation's labels (risk)

    # ---- derived ---------------------------------------------------------------------------
    def negative_share(self) -> float:
        """The largest share of negative finals among the last finals of a group the rules watch
        (stream.core.risk)."""
        finals = [(c.role, c.speaker or "", c.emotion) for _, c in sorted(self.cells.items()) if c.status == "final"]
        return max(negative_shares(self.rules, finals).values(), default=0.0)

    def open_by_severity(self) -> dict[str, int]:
        counts = {"critical": 0, "warning": 0, "info": 0}
        for alert in self.open_alerts.values():
            sev = alert.get("severity")
            if sev in counts:
                counts[sev] += 1
        return counts

    def risk(self) -> float:
        """stream.core.risk's formula: the summaries' `risk` for the same finals and open alerts."""
        return risk_score([self.negative_share()], [a.get("severity") for a in self.open_alerts.values()])

    def risk_level(self) -> str:
        counts = self.open_by_severity()
        if counts["critical"]:
            return "critical"
        if counts["warning"]:
            return "warning"
        if counts["info"] or self.negative_share() >= ELEVATED_SHARE:
            return "elevated"
        return "low"

    def sort_key(self) -> tuple:
        """Highest risk first, then most recently active (use with reverse=True)."""
        return (round(self.risk(), 6), self.last_seen)

    def header(self) -> dict:
        last = self.cells[max(self.cells)] if self.cells else None  # the newest utterance's current verdict
        counts = self.open_by_severity()
        return {
            "conversation_id": self.conversation_id,
            "state": "ended" if self.ended_at is not None else "active",
            "risk": round(self.risk(), 3),
            "risk_level": self.risk_level(),
            "negative_share": round(self.negative_share(), 3),
            "open_alert_count": len(self.open_alerts),
            "open_alerts_by_severity": counts,
            "open_alerts": sorted(self.open_alerts.values(), key=lambda a: -SEVERITY_RANK.get(a.get("severity"), 0)),
            "last_emotion": last.emotion if last else None,
            "last_status": last.status if last else None,
            "last_role": last.role if last else None,
            "last_speaker": last.speaker if last else None,
            "last_seq": last.seq if last else None,
            "last_updated_seq": self.last_updated_seq,
            "negative_emotions": sorted({e.lower() for e in negative_emotions(self.rules)}),
            "utterances": len(self.cells) + self.dropped_cells,
            "finals": sum(c.status == "final" for c in self.cells.values()),
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "ended_by": self.ended_by,
            "ended_at": self.ended_at,
            "model": self.model,
        }

    def full(self) -> dict:
        out = self.header()
        out["cells"] = [self.cells[s].to_json() for s in sorted(self.cells)]
        out["alerts"] = list(self.alerts)
        out["summary"] = self.summary
        return out


class BoardState:
    """The board. Not thread-safe: feed it from one event loop."""

    def __init__(self, *, max_conversations: int = 200, max_utterances: int = 400, max_alerts: int = 200,
                 max_alerts_per_conversation: int = 50, max_ended: int = 50,
                 clock: Callable[[], float] = time.time, rules_path: Path | None = None,
                 rules: tuple[Rule, ...] | None = None) -> None:
        """`rules`: the alert rules for every conversation; by default each conversation gets the
        rules file for its labels (`rules_path`, else the shipped one: stream.core.rules)."""
        if min(max_conversations, max_utterances, max_alerts, max_alerts_per_conversation, max_ended) < 1:
            raise ValueError("every limit must be at least 1")
        self.max_conversations = max_conversations
        self.max_utterances = max_utterances
        self.max_alerts = max_alerts
        self.max_alerts_per_conversation = max_alerts_per_conversation
        self.max_ended = max_ended
        self.clock = clock
        self.active: dict[str, BoardConversation] = {}
        self.ended: OrderedDict[str, BoardConversation] = OrderedDict()   # oldest first
        self.alerts: deque[dict] = deque(maxlen=max_alerts)           # most recent first
        self._alert_ids: OrderedDict[str, None] = OrderedDict()       # dedup (at-least-once delivery)
        self.stats = {"emotions": 0, "alerts": 0, "summaries": 0, "skipped": 0, "evicted": 0}
        self.rules_path = rules_path
        self._fixed_rules = rules
        self._rules: dict[str, tuple[Rule, ...]] = {}  # rules file -> its rules (two shipped files at most)
        self.rules_for(None)  # a rules file that does not load stops the board at start, not at its first event

    def rules_for(self, labels: tuple[str, ...] | None) -> tuple[Rule, ...]:
        """The alert rules for a model's labels: the configured file, else the shipped one for them."""
        if self._fixed_rules is not None:
            return self._fixed_rules
        source = str(self.rules_path or default_rules_path(labels))
        if source not in self._rules:
            self._rules[source] = load_rules(self.rules_path, labels)
        return self._rules[source]

    # ---- lookup ------------------------------------------------------------------------------
    def get(self, conversation_id: str) -> BoardConversation | None:
        return self.active.get(conversation_id) or self.ended.get(conversation_id)

    def ranked(self) -> list[BoardConversation]:
        """Active conversations, riskiest first (ties: most recently active first)."""
        return sorted(self.active.values(), key=BoardConversation.sort_key, reverse=True)

    def recently_ended(self) -> list[BoardConversation]:
        return list(reversed(self.ended.values()))

    def _touch(self, conversation_id: str, now: float, deltas: list) -> BoardConversation:
        conv = self.get(conversation_id)
        if conv is None:
            conv = BoardConversation(conversation_id, first_seen=now, last_seen=now, rules=self.rules_for(None))
            self.active[conversation_id] = conv
            self._evict_over_capacity(deltas, keep=conversation_id)
        conv.last_seen = max(conv.last_seen, now)
        return conv

    def _evict_over_capacity(self, deltas: list, keep: str) -> None:
        while len(self.active) > self.max_conversations:
            victim = min((c for c in self.active.values() if c.conversation_id != keep),
                         key=lambda c: c.last_seen)
            del self.active[victim.conversation_id]
            self.stats["evicted"] += 1
            deltas.append({"op": "remove", "conversation_id": victim.conversation_id})

    # ---- emotions ----------------------------------------------------------------------------
    def apply_emotion(self, event: Any) -> list[dict]:
        if not isinstance(event, dict):
            return self._skip()
        cid = _str(event.get("conversation_id"), 128)
        seq = _as_int(event.get("seq"))
        status = event.get("status")
        emotion = _str(event.get("emotion"), 40)
        if not cid or seq is None or seq < 0 or status not in STATUS_RANK or not emotion:
            return self._skip()
        scores = event.get("scores")
        score = None
        if isinstance(scores, dict):
            score = _num(scores.get(emotion))
            if score is None:
                score = max((v for v in map(_num, scores.values()) if v is not None), default=None)
        cell = Cell(seq=seq, speaker=_str(event.get("speaker"), 128), role=_str(event.get("role"), 40),
                    emotion=emotion, score=None if score is None else round(score, 4), status=status,
                    ts_emitted=_num(event.get("ts_emitted")))
        self.stats["emotions"] += 1
        deltas: list[dict] = []
        conv = self._touch(cid, self.clock(), deltas)
        conv.model = _clean_model(event.get("model")) or conv.model
        if isinstance(scores, dict) and scores:
            conv.rules = self.rules_for(tuple(str(k) for k in scores))
        current = conv.cells.get(seq)
        if current is not None and STATUS_RANK[current.status] > STATUS_RANK[status]:
            # e.g. a provisional redelivered after its final: the final stands
            deltas.append({"op": "conv", "conv": conv.header()})
            return deltas
        if current is None and conv.cells and len(conv.cells) >= self.max_utterances and seq < min(conv.cells):
            conv.dropped_cells += 1  # older than everything kept: counted, not stored
            deltas.append({"op": "conv", "conv": conv.header()})
            return deltas
        conv.cells[seq] = cell
        conv.last_updated_seq = seq
        removed = self._trim_cells(conv)
        deltas.append({"op": "cell", "conversation_id": cid, "cell": cell.to_json()})
        if removed:
            deltas.append({"op": "trim", "conversation_id": cid, "below_seq": min(conv.cells)})
        deltas.append({"op": "conv", "conv": conv.header()})
        return deltas

    def _trim_cells(self, conv: BoardConversation) -> int:
        excess = len(conv.cells) - self.max_utterances
        if excess <= 0:
            return 0
        for seq in sorted(conv.cells)[:excess]:
            del conv.cells[seq]
        conv.dropped_cells += excess
        if conv.last_updated_seq not in conv.cells:
            conv.last_updated_seq = max(conv.cells)
        return excess

    # ---- alerts --------------------------------------------------------------------------------
    def apply_alert(self, event: Any) -> list[dict]:
        if not isinstance(event, dict):
            return self._skip()
        alert_id = _str(event.get("alert_id"), 128)
        cid = _str(event.get("conversation_id"), 128)
        kind = event.get("kind")
        if not alert_id or not cid or kind not in ("raised", "recovered"):
            return self._skip()
        if alert_id in self._alert_ids:
            return []  # duplicate delivery
        self._alert_ids[alert_id] = None
        while len(self._alert_ids) > max(self.max_alerts * 10, 1000):
            self._alert_ids.popitem(last=False)
        severity = event.get("severity") if event.get("severity") in SEVERITY_RANK else "info"
        alert = {
            "alert_id": alert_id, "conversation_id": cid, "rule": _str(event.get("rule"), 80) or "?",
            "kind": kind, "severity": severity, "role": _str(event.get("role"), 40),
            "speaker": _str(event.get("speaker"), 128), "seq_from": _as_int(event.get("seq_from")),
            "seq_to": _as_int(event.get("seq_to")), "reason": _str(event.get("reason"), 500) or "",
            "closes": _str(event.get("closes"), 128), "model": _clean_model(event.get("model")),
            "ts_emitted": _num(event.get("ts_emitted")),
        }
        self.stats["alerts"] += 1
        deltas: list[dict] = []
        conv = self._touch(cid, self.clock(), deltas)
        self.alerts.appendleft(alert)
        conv.alerts.appendleft(alert)
        while len(conv.alerts) > self.max_alerts_per_conversation:
            conv.alerts.pop()
        if kind == "raised":
            conv.open_alerts[alert_id] = alert
        elif alert["closes"] in conv.open_alerts:  # the contract names the raised alert it closes
            del conv.open_alerts[alert["closes"]]
        else:  # no (known) `closes`: pair on (rule, role, speaker), as the schema allows
            key = (alert["rule"], alert["role"], alert["speaker"])
            for open_id in [i for i, a in conv.open_alerts.items() if (a["rule"], a["role"], a["speaker"]) == key]:
                del conv.open_alerts[open_id]
        deltas.append({"op": "alert", "alert": alert})
        deltas.append({"op": "conv", "conv": conv.header()})
        return deltas

    # ---- summaries -----------------------------------------------------------------------------
    def apply_summary(self, event: Any) -> list[dict]:
        if not isinstance(event, dict):
            return self._skip()
        cid = _str(event.get("conversation_id"), 128)
        if not cid:
            return self._skip()
        self.stats["summaries"] += 1
        now = self.clock()
        deltas: list[dict] = []
        conv = self.active.pop(cid, None) or self.ended.pop(cid, None)
        if conv is None:
            conv = BoardConversation(cid, first_seen=now, last_seen=now, rules=self.rules_for(None))
        conv.last_seen = max(conv.last_seen, now)
        conv.summary = self._clean_summary(event)
        conv.ended_by = conv.summary["ended_by"]
        conv.ended_at = conv.ended_at or now
        conv.model = conv.summary["model"] or conv.model
        conv.open_alerts.clear()  # an ended conversation has nothing left to act on
        # Fill the utterances we never saw (dashboard started late, cells trimmed) from the trajectory.
        filled = False
        for point in conv.summary["trajectory"]:
            seq = point["seq"]
            if seq is not None and seq not in conv.cells and point["emotion"]:
                conv.cells[seq] = Cell(seq, point["speaker"], point["role"], point["emotion"], point["score"],
                                       "final", conv.summary["ts_emitted"])
                filled = True
        if filled:
            self._trim_cells(conv)
            if conv.last_updated_seq is None or conv.last_updated_seq not in conv.cells:
                conv.last_updated_seq = max(conv.cells)
        self.ended[cid] = conv
        while len(self.ended) > self.max_ended:
            old, _ = self.ended.popitem(last=False)
            deltas.append({"op": "remove", "conversation_id": old})
        deltas.append({"op": "ended", "conversation": conv.full()})
        return deltas

    @staticmethod
    def _clean_point(p: Any) -> dict | None:
        if not isinstance(p, dict):
            return None
        return {"seq": _as_int(p.get("seq")), "role": _str(p.get("role"), 40), "speaker": _str(p.get("speaker"), 128),
                "emotion": _str(p.get("emotion"), 40), "score": _num(p.get("score"))}

    def _clean_summary(self, event: dict) -> dict:
        distribution: dict[str, dict[str, int]] = {}
        raw = event.get("distribution")
        if isinstance(raw, dict):
            for who, counts in list(raw.items())[:64]:  # the contract caps it at 64 keys
                if isinstance(counts, dict):
                    distribution[_str(who, 128) or "?"] = {
                        _str(e, 40) or "?": n for e, n in list(counts.items())[:40] if _as_int(n) is not None}
        traj = event.get("trajectory") if isinstance(event.get("trajectory"), list) else []
        peaks = event.get("peaks") if isinstance(event.get("peaks"), list) else []
        alerts = event.get("alerts") if isinstance(event.get("alerts"), list) else []
        open_ids = event.get("open_alerts") if isinstance(event.get("open_alerts"), list) else []
        return {
            "summary_id": _str(event.get("summary_id"), 128),
            "conversation_id": _str(event.get("conversation_id"), 128),
            "ended_by": _str(event.get("ended_by"), 20) or "end",
            "utterances": _as_int(event.get("utterances")),
            "distribution": distribution,
            # the whole trajectory is used to fill cells; only the kept tail is sent to browsers
            "trajectory": [p for p in map(self._clean_point, traj[-self.max_utterances:]) if p],
            "peaks": [p for p in map(self._clean_point, peaks[:3]) if p],
            "alerts": [{"alert_id": _str(a.get("alert_id"), 128), "rule": _str(a.get("rule"), 80),
                        "kind": _str(a.get("kind"), 20), "severity": _str(a.get("severity"), 20),
                        "seq_from": _as_int(a.get("seq_from")), "seq_to": _as_int(a.get("seq_to"))}
                       for a in alerts[-self.max_alerts_per_conversation:] if isinstance(a, dict)],
            "alerts_truncated": event.get("alerts_truncated") is True or len(alerts) > self.max_alerts_per_conversation,
            "trajectory_truncated": event.get("trajectory_truncated") is True or len(traj) > self.max_utterances,
            "open_alerts": [i for i in map(lambda x: _str(x, 128), open_ids[:100]) if i],
            "risk": _num(event.get("risk")),
            "model": _clean_model(event.get("model")),
            "ts_emitted": _num(event.get("ts_emitted")),
        }

    # ---- housekeeping ----------------------------------------------------------------------------
    def evict_idle(self, max_idle_s: float) -> list[dict]:
        """Drop active conversations with no event for `max_idle_s` seconds (their summary, if the
        worker ever sends one, brings them back as ended)."""
        cutoff = self.clock() - max_idle_s
        deltas = []
        for cid in [c.conversation_id for c in self.active.values() if c.last_seen < cutoff]:
            del self.active[cid]
            self.stats["evicted"] += 1
            deltas.append({"op": "remove", "conversation_id": cid})
        return deltas

    def apply(self, topic_kind: str, event: Any) -> list[dict]:
        """Dispatch on the kind of topic: "emotions", "alerts" or "summaries"."""
        handler = {"emotions": self.apply_emotion, "alerts": self.apply_alert, "summaries": self.apply_summary}.get(topic_kind)
        if handler is None:
            raise ValueError(f"unknown topic kind {topic_kind!r}")
        return handler(event)

    def _skip(self) -> list[dict]:
        self.stats["skipped"] += 1
        return []

    def limits(self) -> dict:
        return {"max_conversations": self.max_conversations, "max_utterances": self.max_utterances,
                "max_alerts": self.max_alerts, "max_alerts_per_conversation": self.max_alerts_per_conversation,
                "max_ended": self.max_ended}

    def snapshot(self) -> dict:
        return {
            "limits": self.limits(),
            "conversations": [c.full() for c in self.ranked()],
            "ended": [c.full() for c in self.recently_ended()],
            "alerts": list(self.alerts),
            "stats": dict(self.stats),
            "ts": self.clock(),
        }


def coalesce(deltas: list[dict]) -> list[dict]:
    """Keep only the last "conv" header per conversation (sent after the other deltas), so a burst of
    events costs the browsers one header per conversation."""
    headers: dict[str, dict] = {}
    out = []
    for d in deltas:
        if d.get("op") == "conv":
            cid = d["conv"]["conversation_id"]
            headers.pop(cid, None)
            headers[cid] = d
        else:
            if d.get("op") in ("remove", "ended"):
                headers.pop(d.get("conversation_id") or d.get("conversation", {}).get("conversation_id"), None)
            out.append(d)
    return out + list(headers.values())
