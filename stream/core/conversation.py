"""A conversation's logic as pure functions: `advance_conversations(states, inputs) -> (states, outcome)`.

No Kafka, no Redis here: the worker loads the conversations of a batch, calls
`advance_conversations`, publishes what it returns and stores the new states (their bytes:
stream.core.codec). Tests drive it directly. The model's own step (`model.streaming.step`) is a
parameter: this module never loads a model.

Event rules (docs/architecture.md), with L the model's lookahead:
- utterance t arrives -> `provisional` for t (or `final` at once when L = 0);
- t-1..t-L+1 re-scored -> `revised` for those whose label changed;
- t-L re-scored with L later utterances -> `final`, exactly once;
- the conversation goes quiet for `idle_finalize_s` (event time) -> `final` for every utterance
  awaiting one (`flush`); the conversation stays open and a later utterance continues with the same
  context (utterances already final are never re-scored into events again);
- end of conversation (control message, or no utterance for `abandon_after_s`) -> `final` for every
  utterance awaiting one, then the summary.
Delivery: a message with seq <= last applied seq is a redelivery and is not applied again,
unless its content provably differs (its seq is among the last `window` applied and its digest is
not the one applied): that is a seq regression and goes to the DLQ.
Gaps (docs/architecture.md, "Seq gaps"): an utterance whose seq skips ahead is held (with its vector) until the
missing seqs arrive; after `gap_wait_s` (event time), more than `window` held utterances, or the
conversation's end, the held ones are applied in seq order and the first after each hole carries
`gap: true`. A skipped seq that arrives after that goes to the DLQ as `seq_late`.
Model changes (a rolling upgrade): the state records the model that wrote it; another model's
state is not continued: its utterances awaiting a final get them under that model's id and scores,
and the new model starts the context over (`context_reset`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from model.streaming import DialogueState, Scored, finalize
from stream.core.events import event_id, model_field
from stream.core.frozen import check_evolvable, evolve
from stream.core.monitor import MonitorState, on_final
from stream.core.rules import Rule
from stream.core.summary import summarize
from stream.core.validate import EndMessage, Rejected, UtteranceMessage


@check_evolvable
@dataclass(frozen=True)
class UttMeta:
    """What an utterance keeps until its final event (no text unless text echo is on)."""

    seq: int
    speaker: str
    role: str | None
    ts_produced: float | None
    ts_received: float
    label: str | None = None  # last label emitted for it
    text: str | None = None  # only kept when text echo is on
    gap: bool = False  # seqs before it were skipped (never arrived within the gap wait)


@check_evolvable
@dataclass(frozen=True)
class Held:
    """An utterance that arrived after a hole in seq, waiting for the missing ones (no text kept
    unless text echo is on: its encoder vector is enough to apply it later)."""

    meta: UttMeta
    digest: str
    event_ts: float
    vector_bytes: bytes  # float32


MAX_SKIPPED = 64  # skipped seqs remembered (a late one goes to the DLQ as seq_late)


@check_evolvable
@dataclass(frozen=True)
class ConversationState:
    """Everything the worker stores for one conversation (stream.core.codec writes it)."""

    dialogue: DialogueState = field(default_factory=DialogueState)
    last_seq: int = -1
    ended: bool = False
    context_reset: bool = False  # state was missing mid-conversation: context starts over
    last_activity: float = 0.0  # worker wall clock of the last applied input
    # Event time (Kafka message timestamp, unix seconds) of the last applied utterance: idleness
    # is measured against the partition's event-time progress, not the worker's clock.
    last_event_ts: float = 0.0
    ended_by: str | None = None  # "end" or "abandoned" once ended
    # Model position -> utterance whose final event is still to come (the model keeps their
    # latest probabilities in `dialogue.pending`).
    awaiting_final: dict[int, UttMeta] = field(default_factory=dict)
    recent: dict[int, str] = field(default_factory=dict)  # seq -> content digest (last `window`)
    monitor: MonitorState = field(default_factory=MonitorState)  # alert rules and summary accumulators
    # Who wrote it: the model ("name@version") and its labels (a state of another model is not
    # continued, its utterances awaiting a final get it under its own id).
    model_id: str | None = None
    labels: tuple[str, ...] | None = None
    held: dict[int, Held] = field(default_factory=dict)  # seq -> utterance waiting for a missing seq
    skipped: tuple[int, ...] = ()  # seqs given up on (gap), newest last, at most MAX_SKIPPED
    # Written by the state store: the fencing version (compare-and-set on every write) and the
    # input partition the conversation was last saved from (an entry in another partition's
    # timer sets is stale and never flushes it).
    version: int = 0
    partition: int | None = None

    def tombstone(self) -> "ConversationState":
        """What an ended conversation keeps for the TTL: enough to recognise redeliveries and late
        utterances (last seq, recent digests, who wrote it, how it ended), not its model state,
        alert accumulators or utterances awaiting a final (a few hundred bytes instead of tens of KB)."""
        return ConversationState(last_seq=self.last_seq, ended=True, ended_by=self.ended_by,
                                 context_reset=self.context_reset, last_activity=self.last_activity,
                                 last_event_ts=self.last_event_ts, recent=self.recent, model_id=self.model_id,
                                 skipped=self.skipped, version=self.version, partition=self.partition)


@dataclass(frozen=True)
class ConversationConfig:
    labels: tuple[str, ...]
    model_id: str  # "name@version", part of every event id
    window: int  # how many recent seqs are remembered for redelivery detection
    echo_text: bool = False
    rules: tuple[Rule, ...] = ()  # alert rules over final events (stream/rules/default.toml)
    # Event time an utterance after a hole in seq waits for the missing ones (docs/architecture.md, "Seq gaps").
    gap_wait_s: float = 5.0


@dataclass
class Outcome:
    events: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[tuple[int, Rejected]] = field(default_factory=list)  # (input index, why)
    duplicates: list[int] = field(default_factory=list)  # input indexes recognised as redelivered
    alerts: list[dict[str, Any]] = field(default_factory=list)
    summaries: list[dict[str, Any]] = field(default_factory=list)
    gaps_filled: int = 0  # missing seqs that arrived while later ones were held
    gaps_skipped: int = 0  # missing seqs given up on (the next utterance's events carry gap: true)
    model_changes: int = 0  # conversations whose state another model wrote (context started over)

    def extend(self, other: "Outcome") -> None:
        """Add what `other` publishes and counts (the input indexes stay its own)."""
        for name in ("events", "alerts", "summaries"):
            getattr(self, name).extend(getattr(other, name))
        self.gaps_filled += other.gaps_filled
        self.gaps_skipped += other.gaps_skipped
        self.model_changes += other.model_changes


def _event(cfg: ConversationConfig, cid: str, conv: ConversationState, meta: UttMeta, probs: np.ndarray, status: str,
           label: str, now: float, horizon_seq: int | None) -> dict[str, Any]:
    ev = {
        "event_id": event_id(cfg.model_id, cid, meta.seq, status, horizon_seq if status == "revised" else None),
        "conversation_id": cid,
        "seq": meta.seq,
        "speaker": meta.speaker,
        "role": meta.role,
        "emotion": label,
        "scores": dict(zip(cfg.labels, [round(p, 5) for p in probs.tolist()])),
        "status": status,
        "model": model_field(cfg.model_id),
        "context_reset": conv.context_reset,
        "gap": meta.gap,
        "ts_produced": meta.ts_produced,
        "ts_received": meta.ts_received,
        "ts_emitted": now,
    }
    if cfg.echo_text and meta.text is not None:
        ev["text"] = meta.text
    return ev


def _status(s: Scored, meta: UttMeta, label: str, newest: int) -> str | None:
    """The event a new score makes: final, the first verdict (provisional), a changed label
    (revised), or none."""
    if s.final:
        return "final"
    if s.position == newest and meta.label is None:
        return "provisional"
    return "revised" if label != meta.label else None


def _emit_scores(cfg: ConversationConfig, cid: str, conv: ConversationState, scored: Sequence[Scored], now: float,
                 horizon_seq: int, out: Outcome) -> ConversationState:
    """Turn model scores into events (and final events into alerts); returns the updated conversation."""
    awaiting = dict(conv.awaiting_final)
    monitor = conv.monitor
    newest = max(s.position for s in scored) if scored else -1
    for s in scored:
        meta = awaiting.get(s.position)
        if meta is None:  # finalised earlier (cannot happen with a consistent state); nothing to say
            continue
        label = cfg.labels[int(np.argmax(s.probs))]
        status = _status(s, meta, label, newest)
        if status is not None:
            event = _event(cfg, cid, conv, meta, s.probs, status, label, now, horizon_seq)
            out.events.append(event)
            if status == "final" and cfg.rules:
                monitor, alerts = on_final(cfg.rules, monitor, event, now)
                out.alerts.extend(alerts)
        if s.final:
            awaiting.pop(s.position)
        else:
            awaiting[s.position] = evolve(meta, label=label)
    return evolve(conv, awaiting_final=awaiting, monitor=monitor)


def _writer_cfg(cfg: ConversationConfig, conv: ConversationState) -> ConversationConfig:
    """The config of the model that wrote `conv`: its scores are finalised under its own id (and
    labels; alert rules only when the labels are the same)."""
    if conv.model_id is None or conv.model_id == cfg.model_id:
        return cfg
    labels = conv.labels or cfg.labels
    return replace(cfg, model_id=conv.model_id, labels=labels, rules=cfg.rules if labels == cfg.labels else ())


def flush_conversation(cfg: ConversationConfig, cid: str, conv: ConversationState, now: float,
                       out: Outcome) -> ConversationState:
    """A pause (idle timeout): the utterances awaiting a final get it with their latest scores; the
    conversation stays open. The model state (window, forward GRU state) is kept, so a later
    utterance continues with the same context. When it arrives the model re-scores the last L + 1
    positions again; those already final are no longer in `awaiting_final`, so `_emit_scores`
    says nothing about them: a final is never revised or emitted twice."""
    dialogue, scored = finalize(conv.dialogue)
    conv = evolve(conv, dialogue=dialogue)
    return _emit_scores(_writer_cfg(cfg, conv), cid, conv, scored, now, conv.last_seq, out)


def end_conversation(cfg: ConversationConfig, cid: str, conv: ConversationState, now: float, out: Outcome,
                     ended_by: str = "end") -> ConversationState:
    """Finalise the utterances awaiting a final, publish the conversation's summary, keep a tombstone."""
    conv = flush_conversation(cfg, cid, conv, now, out)
    out.summaries.append(summarize(conv.monitor, cid, ended_by, cfg.model_id, now))
    return evolve(conv, ended=True, ended_by=ended_by, last_activity=now).tombstone()


def on_idle(cfg: ConversationConfig, conversations: dict[str, ConversationState | None],
            abandoned: set[str] | frozenset[str], now: float, model_step: "ModelStep | None" = None,
            event_now: float | None = None, flush: set[str] | None = None) -> tuple[dict[str, ConversationState], Outcome]:
    """The idle timer's step: held utterances whose gap wait is over (event time `event_now`) are
    applied (`gap: true`); conversations in `abandoned` (quiet for `abandon_after_s`) end with
    their summary (ended_by "abandoned"); the others (quiet for `idle_finalize_s`) are flushed and
    stay open (only those in `flush` when given: the others came for their held utterances).
    Returns the conversations that changed and what to publish."""
    out = Outcome()
    changed: dict[str, ConversationState] = {}
    due = {}
    for cid, conv in conversations.items():
        if conv is None or conv.ended or not conv.held:
            continue
        oldest = min(h.event_ts for h in conv.held.values())
        if cid in abandoned or event_now is None or oldest <= event_now - cfg.gap_wait_s:
            due[cid] = conv
    if due and model_step is not None:
        no_inputs = _Inputs((), np.zeros((0, 0), np.float32), None)
        released, out = _run_rounds(cfg, model_step, due, {cid: [_RELEASE] for cid in due}, no_inputs, now)
        changed.update(released)
    for cid, conv in conversations.items():
        conv = changed.get(cid, conv)
        if conv is None or conv.ended:
            continue
        if cid in abandoned:
            changed[cid] = end_conversation(cfg, cid, conv, now, out, ended_by="abandoned")
        elif conv.awaiting_final and (flush is None or cid in flush) and cid not in due:
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


ModelStep = Callable[[list[DialogueState], np.ndarray, list[str]], tuple[list[DialogueState], list[list[Scored]]]]

_RELEASE = "release"  # queue item: apply every held utterance now (gap wait over, end, too many held)


def advance_conversations(
    cfg: ConversationConfig,
    model_step: ModelStep,
    conversations: dict[str, ConversationState | None],
    inputs: Sequence[UtteranceMessage | EndMessage],
    vectors: np.ndarray,  # (len(inputs), D): the utterance vectors (rows of EndMessage inputs are unused)
    now: float,
    event_ts: Sequence[float] | None = None,  # per input: its Kafka message timestamp (default: now)
) -> tuple[dict[str, ConversationState], Outcome]:
    """Apply a batch of validated inputs in order per conversation.

    `model_step` is `model.streaming.step` bound to a model: it advances several conversations
    by one utterance each in one call. Inputs of one conversation are applied in rounds (its
    r-th input in round r), so order within a conversation is kept while the model still sees
    every conversation of the round at once.
    """
    queues: dict[str, list] = {}
    for i, item in enumerate(inputs):
        queues.setdefault(item.conversation_id, []).append(i)
    return _run_rounds(cfg, model_step, dict(conversations), queues, _Inputs(inputs, vectors, event_ts), now)


@dataclass(frozen=True)
class _Inputs:
    """A batch's validated inputs with their vectors and Kafka timestamps (None: now)."""

    items: Sequence[UtteranceMessage | EndMessage]
    vectors: np.ndarray
    event_ts: Sequence[float] | None


@dataclass(frozen=True)
class _Ready:
    """An utterance the model steps in this round."""

    cid: str
    meta: UttMeta
    digest: str
    event_ts: float
    vector: np.ndarray


def _run_rounds(cfg, model_step, convs, queues, inputs: _Inputs, now, out: Outcome | None = None):
    """The round loop behind `advance_conversations` and the timer's gap release. A queue holds
    input indexes and `_RELEASE`; applying seq s puts held seq s + 1 at the head of its
    conversation's queue."""
    out = out or Outcome()
    queues = {cid: list(q) for cid, q in queues.items()}
    while any(queues.values()):
        ready = []
        for cid, q in queues.items():
            r = _next_ready(cfg, cid, q, convs, inputs, now, out) if q else None
            if r is not None:
                ready.append(r)
        if ready:
            _step_round(cfg, model_step, ready, convs, queues, now, out)
    # Conversations still without state (an `end` for an unknown one, say) have nothing to store.
    return {cid: c for cid, c in convs.items() if c is not None}, out


def _next_ready(cfg, cid: str, queue: list, convs, inputs: _Inputs, now: float, out: Outcome) -> _Ready | None:
    """Take the head of a conversation's queue: None when it needs no model step this round."""
    work = queue.pop(0)
    conv = convs.get(cid)
    if conv is not None and not conv.ended and conv.model_id not in (None, cfg.model_id):
        conv = convs[cid] = _restart_for_model(cfg, cid, conv, now, out)
    if work == _RELEASE or isinstance(work, tuple):
        return _take_held(cid, work, queue, convs, conv, out)
    return _take_input(cfg, cid, work, queue, convs, conv, inputs, now, out)


def _take_held(cid: str, work, queue: list, convs, conv: ConversationState | None, out: Outcome) -> _Ready | None:
    """The next held utterance (`_RELEASE`: the oldest, and the rest after it; ("held", seq): that one)."""
    if conv is None or conv.ended or not conv.held or (work != _RELEASE and work[1] not in conv.held):
        return None
    seq = min(conv.held) if work == _RELEASE else work[1]
    held = conv.held[seq]
    rest = {k: v for k, v in conv.held.items() if k != seq}
    gap = seq != conv.last_seq + 1
    if gap:
        skipped = tuple(range(conv.last_seq + 1, seq))
        out.gaps_skipped += len(skipped)
        conv = evolve(conv, skipped=(conv.skipped + skipped[-MAX_SKIPPED:])[-MAX_SKIPPED:])
    convs[cid] = evolve(conv, held=rest)
    if work == _RELEASE and rest:
        queue.insert(0, _RELEASE)  # the rest after this one, in seq order
    return _Ready(cid, evolve(held.meta, gap=gap), held.digest, held.event_ts, np.frombuffer(held.vector_bytes, dtype=np.float32))


def _take_input(cfg, cid: str, i: int, queue: list, convs, conv: ConversationState | None, inputs: _Inputs,
                now: float, out: Outcome) -> _Ready | None:
    """Input i: an end, a redelivery, a rejection, an utterance to hold for a missing seq, or one to step."""
    item = inputs.items[i]
    if isinstance(item, EndMessage):
        if conv is None or conv.ended:
            return None  # nothing pending: an end for an unknown or ended conversation is a no-op
        if conv.held:  # the missing seqs will not come: apply the held ones first
            queue[:0] = [_RELEASE, i]
            return None
        convs[cid] = end_conversation(cfg, cid, conv, now, out)
        return None
    verdict = _admit(conv, item)
    if verdict == "duplicate":
        out.duplicates.append(i)
        return None
    if isinstance(verdict, Rejected):
        out.rejected.append((i, verdict))
        return None
    ts = now if inputs.event_ts is None else inputs.event_ts[i]
    meta = UttMeta(item.seq, item.speaker, item.role, item.ts, now, text=item.text if cfg.echo_text else None)
    if verdict == "hold":
        held = {**conv.held, item.seq: Held(meta, item.digest, ts, np.asarray(inputs.vectors[i], np.float32).tobytes())}
        convs[cid] = evolve(conv, held=held)
        if len(held) > cfg.window:  # bounded: do not wait for more than a window's worth
            queue.insert(0, _RELEASE)
        return None
    if conv is not None and conv.held and item.seq in range(conv.last_seq + 1, min(conv.held)):
        out.gaps_filled += 1
    return _Ready(cid, meta, item.digest, ts, inputs.vectors[i])


def _step_round(cfg, model_step: ModelStep, ready: list[_Ready], convs, queues, now: float, out: Outcome) -> None:
    """One model step for the round's utterances (one per conversation), then their events."""
    states = []
    for r in ready:
        # No state: a new conversation, or its state was lost (Redis flushed, TTL): start over and
        # flag the events unless this is its first utterance.
        conv = convs.get(r.cid) or ConversationState(context_reset=r.meta.seq > 0)
        convs[r.cid] = conv
        states.append(conv.dialogue)
    vectors = np.stack([np.asarray(r.vector, np.float32) for r in ready])
    new_states, scored = model_step(states, vectors, [r.meta.speaker for r in ready])
    for r, dialogue, sc in zip(ready, new_states, scored):
        conv = _applied(cfg, convs[r.cid], r, dialogue, now)
        convs[r.cid] = _emit_scores(cfg, r.cid, conv, sc, now, r.meta.seq, out)
        if r.meta.seq + 1 in conv.held:  # the hole before it is filled: the held one follows
            queues.setdefault(r.cid, []).insert(0, ("held", r.meta.seq + 1))


def _applied(cfg: ConversationConfig, conv: ConversationState, r: _Ready, dialogue: DialogueState,
             now: float) -> ConversationState:
    """The conversation after the model stepped utterance `r` (its events not yet emitted)."""
    recent = {s: d for s, d in conv.recent.items() if s > r.meta.seq - cfg.window}
    recent[r.meta.seq] = r.digest
    return evolve(conv, dialogue=dialogue, last_seq=r.meta.seq, last_activity=now, model_id=cfg.model_id,
                   labels=tuple(cfg.labels), last_event_ts=max(conv.last_event_ts, r.event_ts),
                   awaiting_final={**conv.awaiting_final, dialogue.seen - 1: r.meta}, recent=recent)


def _restart_for_model(cfg: ConversationConfig, cid: str, conv: ConversationState, now: float,
                       out: Outcome) -> ConversationState:
    """Another model wrote this state (a rolling upgrade): its GRU state and vectors mean nothing to
    this model. Its utterances awaiting a final get them under its own id and scores; the context
    starts over (`context_reset`); seq bookkeeping, held utterances and the summary carry on."""
    conv = flush_conversation(cfg, cid, conv, now, out)
    out.model_changes += 1
    return evolve(conv, dialogue=DialogueState(), awaiting_final={}, context_reset=True, model_id=cfg.model_id,
                   labels=tuple(cfg.labels))


def _admit(conv: ConversationState | None, item: UtteranceMessage) -> str | Rejected:
    """What to do with an utterance: apply it, hold it (a seq before it is missing), skip it (a
    duplicate, i.e. a redelivery), or reject it (Rejected says why)."""
    if conv is None:
        return "apply"
    if item.seq <= conv.last_seq:
        if conv.recent.get(item.seq) == item.digest:
            return "duplicate"
        if item.seq in conv.recent:  # provably different content
            return Rejected("seq_regression", f"seq {item.seq} repeats with different content (last applied seq {conv.last_seq})")
        if item.seq in conv.skipped:
            return Rejected("seq_late", f"seq {item.seq} arrived after the gap wait; the conversation went on without it "
                                        f"(last applied seq {conv.last_seq})")
        # Older than the digests kept: a redelivery (after a rebalance or a restart from an old
        # committed offset); nothing says its content differs.
        return "duplicate"
    if conv.ended:
        how = "it was abandoned (no utterance for the abandonment timeout)" if conv.ended_by == "abandoned" else "its end message"
        return Rejected("conversation_ended", f"seq {item.seq} arrived after the conversation ended ({how}; last seq {conv.last_seq})")
    if item.seq in conv.held:
        return "duplicate" if conv.held[item.seq].digest == item.digest else Rejected(
            "seq_regression", f"seq {item.seq} repeats with different content (it is waiting for a missing seq)")
    if item.seq > conv.last_seq + 1:
        return "hold"
    return "apply"
