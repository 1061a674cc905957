"""The stream's logic as a pure function: `step(state, inputs) -> (state, events)`.

No Kafka, no Redis here: the worker loads the conversations of a batch, calls `step`, publishes
what it returns and stores the new states. Tests drive it directly.

Event rules (DESIGN.md, "Streaming semantics"), with L the model's lookahead:
- utterance t arrives -> `provisional` for t (or `final` at once when L = 0);
- t-1..t-L+1 re-scored -> `revised` for those whose label changed;
- t-L re-scored with L later utterances -> `final`, exactly once;
- the conversation goes quiet for `idle_finalize_s` (event time) -> `final` for every pending
  utterance (`flush`); the conversation stays open and a later utterance continues with the same
  context (utterances already final are never re-scored into events again);
- end of conversation (control message, or no utterance for `abandon_after_s`) -> `final` for every
  pending utterance, then the summary.
Delivery: a message with seq <= last applied seq and the same content is a redelivery and is
not applied again; with other content it is a seq regression and goes to the DLQ.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from model.streaming import DialogueState, Scored, finalize
from stream.alerts import MonitorState, Rule, on_final, summarize
from stream.validate import End, Rejected, Utterance


@dataclass(frozen=True)
class UttMeta:
    seq: int
    speaker: str
    role: str | None
    ts_produced: float | None
    ts_received: float
    label: str | None = None  # last label emitted for it
    text: str | None = None  # only kept when text echo is on


@dataclass(frozen=True)
class Conversation:
    dialogue: DialogueState = field(default_factory=DialogueState)
    last_seq: int = -1
    ended: bool = False
    context_reset: bool = False  # state was missing mid-conversation: context starts over
    last_activity: float = 0.0  # worker wall clock of the last applied input
    # Event time (Kafka message timestamp, unix seconds) of the last applied utterance: idleness
    # is measured against the partition's event-time progress, not the worker's clock.
    last_event_ts: float = 0.0
    ended_by: str | None = None  # "end" or "abandoned" once ended
    pending: dict[int, UttMeta] = field(default_factory=dict)  # model position -> utterance
    recent: dict[int, str] = field(default_factory=dict)  # seq -> content digest (last `window`)
    monitor: MonitorState = field(default_factory=MonitorState)  # alert rules and summary accumulators

    def to_bytes(self) -> bytes:
        meta = {
            "last_seq": self.last_seq,
            "ended": self.ended,
            "context_reset": self.context_reset,
            "last_activity": self.last_activity,
            "last_event_ts": self.last_event_ts,
            "ended_by": self.ended_by,
            "pending": {str(p): vars(m) for p, m in self.pending.items()},
            "recent": {str(s): d for s, d in self.recent.items()},
            "monitor": self.monitor.to_dict(),
        }
        # json.dumps escapes newlines, so the first b"\n" ends the header.
        return json.dumps(meta, separators=(",", ":")).encode() + b"\n" + self.dialogue.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Conversation":
        head, _, body = data.partition(b"\n")
        meta = json.loads(head)
        return cls(
            dialogue=DialogueState.from_bytes(body),
            last_seq=meta["last_seq"],
            ended=meta["ended"],
            context_reset=meta["context_reset"],
            last_activity=meta["last_activity"],
            # states written before these fields existed
            last_event_ts=meta.get("last_event_ts", meta["last_activity"]),
            ended_by=meta.get("ended_by", "end" if meta["ended"] else None),
            pending={int(p): UttMeta(**m) for p, m in meta["pending"].items()},
            recent={int(s): d for s, d in meta["recent"].items()},
            monitor=MonitorState.from_dict(meta["monitor"]),
        )


@dataclass(frozen=True)
class StepConfig:
    labels: tuple[str, ...]
    model_id: str  # "name@version", part of every event id
    window: int  # how many recent seqs are remembered for redelivery detection
    echo_text: bool = False
    rules: tuple[Rule, ...] = ()  # alert rules over final events (stream/rules/default.toml)


@dataclass
class Outcome:
    events: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[tuple[int, Rejected]] = field(default_factory=list)  # (input index, why)
    duplicates: list[int] = field(default_factory=list)  # input indexes recognised as redelivered
    alerts: list[dict[str, Any]] = field(default_factory=list)
    summaries: list[dict[str, Any]] = field(default_factory=list)


def event_id(model_id: str, conversation_id: str, seq: int, status: str, horizon_seq: int | None = None) -> str:
    """Same input, same id: consumers de-duplicate on it after a redelivery."""
    raw = f"{model_id}\x1f{conversation_id}\x1f{seq}\x1f{status}\x1f{'' if horizon_seq is None else horizon_seq}"
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def _model(cfg: StepConfig) -> dict[str, str]:
    name, _, version = cfg.model_id.partition("@")
    return {"name": name, "version": version}


def _event(cfg: StepConfig, cid: str, conv: Conversation, meta: UttMeta, probs: np.ndarray, status: str,
           label: str, now: float, horizon_seq: int | None) -> dict[str, Any]:
    ev = {
        "event_id": event_id(cfg.model_id, cid, meta.seq, status, horizon_seq if status == "revised" else None),
        "conversation_id": cid,
        "seq": meta.seq,
        "speaker": meta.speaker,
        "role": meta.role,
        "emotion": label,
        "scores": {lab: round(float(p), 5) for lab, p in zip(cfg.labels, probs)},
        "status": status,
        "model": _model(cfg),
        "context_reset": conv.context_reset,
        "ts_produced": meta.ts_produced,
        "ts_received": meta.ts_received,
        "ts_emitted": now,
    }
    if cfg.echo_text and meta.text is not None:
        ev["text"] = meta.text
    return ev


def _emit_scores(cfg: StepConfig, cid: str, conv: Conversation, scored: Sequence[Scored], now: float,
                 horizon_seq: int, out: Outcome) -> Conversation:
    """Turn model scores into events (and final events into alerts); returns the updated conversation."""
    pending = dict(conv.pending)
    monitor = conv.monitor
    newest = max(s.position for s in scored) if scored else -1
    for s in scored:
        meta = pending.get(s.position)
        if meta is None:  # finalised earlier (cannot happen with a consistent state); nothing to say
            continue
        label = cfg.labels[int(np.argmax(s.probs))]
        if s.final:
            status = "final"
        elif s.position == newest and meta.label is None:
            status = "provisional"
        elif label != meta.label:
            status = "revised"
        else:
            status = None
        if status is not None:
            event = _event(cfg, cid, conv, meta, s.probs, status, label, now, horizon_seq)
            out.events.append(event)
            if status == "final" and cfg.rules:
                monitor, alerts = on_final(cfg.rules, monitor, event, now)
                out.alerts.extend(alerts)
        if s.final:
            pending.pop(s.position)
        else:
            pending[s.position] = replace(meta, label=label)
    return replace(conv, pending=pending, monitor=monitor)


def flush_conversation(cfg: StepConfig, cid: str, conv: Conversation, now: float, out: Outcome) -> Conversation:
    """A pause (idle timeout): the pending utterances become final with their latest scores; the
    conversation stays open. The model state (window, forward GRU state) is kept, so a later
    utterance continues with the same context. When it arrives the model re-scores the last L + 1
    positions again; those already final have no `UttMeta` in `pending` any more, so
    `_emit_scores` says nothing about them: a final is never revised or emitted twice."""
    dialogue, scored = finalize(conv.dialogue)
    conv = replace(conv, dialogue=dialogue)
    return _emit_scores(cfg, cid, conv, scored, now, conv.last_seq, out)


def end_conversation(cfg: StepConfig, cid: str, conv: Conversation, now: float, out: Outcome,
                     ended_by: str = "end") -> Conversation:
    """Finalise the pending utterances, then publish the conversation's summary."""
    conv = flush_conversation(cfg, cid, conv, now, out)
    out.summaries.append(summarize(conv.monitor, cid, ended_by, _model(cfg), now))
    return replace(conv, ended=True, ended_by=ended_by, last_activity=now)


def on_idle(cfg: StepConfig, conversations: dict[str, Conversation | None], abandoned: set[str] | frozenset[str],
            now: float) -> tuple[dict[str, Conversation], Outcome]:
    """The idle timer's step: conversations in `abandoned` (quiet for `abandon_after_s`) end with
    their summary (ended_by "abandoned"); the others (quiet for `idle_finalize_s`) are flushed and
    stay open. Returns the conversations that changed and what to publish."""
    out = Outcome()
    changed: dict[str, Conversation] = {}
    for cid, conv in conversations.items():
        if conv is None or conv.ended:
            continue
        if cid in abandoned:
            changed[cid] = end_conversation(cfg, cid, conv, now, out, ended_by="abandoned")
        elif conv.pending:
            changed[cid] = flush_conversation(cfg, cid, conv, now, out)
    return changed, out


@dataclass(frozen=True)
class PartitionClock:
    """Event-time progress of one input partition, as the worker that owns it sees it.

    `watermark` is the newest message timestamp read from the partition. While the worker reads
    (a backlog after a restart or an outage), event time is the watermark: conversations whose next
    messages are already waiting are not flushed. When nothing more arrives, event time advances
    with the wall clock, but only by the time the worker spent waiting for input since its last read
    from the partition (`busy` is the worker's running total of time spent processing, which is
    not counted): a quiet partition still gets its flushes, about `idle_finalize_s` after its last
    message, and a worker stuck on a batch (Redis down) does not flush when it comes back.
    """

    watermark: float  # newest message timestamp read (unix seconds)
    wall_at: float  # worker wall clock when the partition was last read (or first owned)
    busy_at: float  # the worker's busy total at that moment

    def advance(self, ts: float, wall: float, busy: float) -> "PartitionClock":
        return PartitionClock(max(self.watermark, ts), wall, busy)

    def now(self, wall: float, busy: float) -> float:
        waited = (wall - self.wall_at) - (busy - self.busy_at)
        return self.watermark + max(0.0, waited)


StepFn = Callable[[list[DialogueState], np.ndarray, list[str]], tuple[list[DialogueState], list[list[Scored]]]]


def step(
    cfg: StepConfig,
    model_step: StepFn,
    conversations: dict[str, Conversation | None],
    inputs: Sequence[Utterance | End],
    vectors: np.ndarray,  # (len(inputs), D): the utterance vectors (rows of End inputs are unused)
    now: float,
    event_ts: Sequence[float] | None = None,  # per input: its Kafka message timestamp (default: now)
) -> tuple[dict[str, Conversation], Outcome]:
    """Apply a batch of validated inputs in order per conversation.

    `model_step` is `model.streaming.step` bound to a model: it advances several conversations
    by one utterance each in one call. Inputs of one conversation are applied in rounds (its
    r-th input in round r), so order within a conversation is kept while the model still sees
    every conversation of the round at once.
    """
    convs: dict[str, Conversation | None] = dict(conversations)
    out = Outcome()
    queues: dict[str, list[int]] = {}
    for i, item in enumerate(inputs):
        queues.setdefault(item.conversation_id, []).append(i)
    rounds = max((len(q) for q in queues.values()), default=0)
    for r in range(rounds):
        batch: list[tuple[str, int]] = []
        for cid, q in queues.items():
            if r >= len(q):
                continue
            i = q[r]
            item = inputs[i]
            conv = convs.get(cid)
            if isinstance(item, End):
                if conv is None or conv.ended:
                    continue  # nothing pending: an end for an unknown or ended conversation is a no-op
                convs[cid] = end_conversation(cfg, cid, conv, now, out)
                continue
            verdict = _admit(conv, item)
            if verdict == "duplicate":
                out.duplicates.append(i)
            elif isinstance(verdict, Rejected):
                out.rejected.append((i, verdict))
            else:
                batch.append((cid, i))
        if not batch:
            continue
        states = []
        for cid, i in batch:
            conv = convs.get(cid)
            item = inputs[i]
            if conv is None:
                # No state: a new conversation, or its state was lost (Redis flushed, TTL):
                # start over and flag the events unless this is its first utterance.
                conv = Conversation(context_reset=item.seq > 0)
            convs[cid] = conv
            states.append(conv.dialogue)
        speakers = [inputs[i].speaker for _, i in batch]
        new_states, scored = model_step(states, vectors[[i for _, i in batch]], speakers)
        for (cid, i), dialogue, sc in zip(batch, new_states, scored):
            item = inputs[i]
            conv = convs[cid]
            position = dialogue.seen - 1
            meta = UttMeta(item.seq, item.speaker, item.role, item.ts, now, text=item.text if cfg.echo_text else None)
            recent = {s: d for s, d in conv.recent.items() if s > item.seq - cfg.window}
            recent[item.seq] = item.digest
            ts = now if event_ts is None else event_ts[i]
            conv = replace(conv, dialogue=dialogue, last_seq=item.seq, last_activity=now,
                           last_event_ts=max(conv.last_event_ts, ts), pending={**conv.pending, position: meta}, recent=recent)
            convs[cid] = _emit_scores(cfg, cid, conv, sc, now, item.seq, out)
    # Conversations still without state (an `end` for an unknown one, say) have nothing to store.
    return {cid: c for cid, c in convs.items() if c is not None}, out


def _admit(conv: Conversation | None, item: Utterance) -> str | Rejected:
    if conv is None:
        return "apply"
    if item.seq <= conv.last_seq:
        if conv.recent.get(item.seq) == item.digest:
            return "duplicate"
        if item.seq in conv.recent:
            return Rejected("seq_regression", f"seq {item.seq} repeats with different content (last applied seq {conv.last_seq})")
        return Rejected("seq_regression", f"seq {item.seq} goes backwards (last applied seq {conv.last_seq})")
    if conv.ended:
        how = "it was abandoned (no utterance for the abandonment timeout)" if conv.ended_by == "abandoned" else "its end message"
        return Rejected("conversation_ended", f"seq {item.seq} arrived after the conversation ended ({how}; last seq {conv.last_seq})")
    return "apply"
