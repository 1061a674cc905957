"""The alert rules at work, as a pure function: `on_final(rules, state, final event) -> (state, alerts)`.

No Kafka, no Redis: the worker keeps one `MonitorState` per conversation next to the stream
state, feeds it every `final` event it emits, publishes the alert events returned, and publishes
the summary (stream.core.summary) when the conversation ends. The rule kinds and the rules file:
stream.core.rules.

Storm control: a raising rule does not raise again for a group while its alert is open, and not
before `cooldown` further finals of the group have passed since it last raised. A group without
a recovery rule keeps its alerts open until the conversation ends.

State is bounded: per group the last `history_size(rules)` finals and a few counters; at most
MAX_GROUPS groups (the least recently active one is dropped beyond that) and MAX_DISTRIBUTION_KEYS
keys in the distribution; the alert list keeps the last MAX_ALERTS alerts; the trajectory keeps
the last MAX_TRAJECTORY finals (stream.core.trajectory).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from stream.core.events import alert_id, model_field, model_id_of
from stream.core.frozen import check_evolvable, evolve
from stream.core.risk import group_key, history_size, negative_emotions, rules_for
from stream.core.rules import Rule
from stream.core.trajectory import MAX_TRAJECTORY, Final, Trajectory

MAX_ALERTS = 100
MAX_GROUPS = 64
MAX_DISTRIBUTION_KEYS = 64
OTHER_KEY = "(other)"  # distribution bucket for groups beyond MAX_DISTRIBUTION_KEYS
N_PEAKS = 3


@dataclass(frozen=True)
class AlertRef:
    """An alert as recorded in the state (and listed in the summary)."""

    alert_id: str
    rule: str
    kind: str  # "raised" or "recovered" (the alert event's kind, not the rule's)
    severity: str
    seq_from: int
    seq_to: int
    speaker: str = ""  # kept for open alerts: their recovery names the same speaker

    def to_dict(self) -> dict[str, Any]:
        """The summary's view (no speaker)."""
        return {"alert_id": self.alert_id, "rule": self.rule, "kind": self.kind, "severity": self.severity,
                "seq_from": self.seq_from, "seq_to": self.seq_to}


@check_evolvable
@dataclass(frozen=True)
class Group:
    """Rule state of one role (or, for null roles, one speaker) in one conversation."""

    key: str  # stream.core.risk.group_key
    role: str | None
    speaker: str  # last speaker seen in the group
    count: int = 0  # finals of the group so far (cooldowns count these)
    last_seq: int = -1
    last_finals: tuple[Final, ...] = ()  # the group's last history_size(rules) finals
    negative: tuple[bool, ...] = ()  # parallel to last_finals: an emotion a rule of the group names (risk)
    last_raised: tuple[tuple[str, int], ...] = ()  # rule name -> group count when it last raised
    calm: tuple[tuple[str, int, int], ...] = ()  # recovery rule -> (run of non-negative finals, seq it began)
    open: tuple[AlertRef, ...] = ()  # raised alerts not yet recovered


@check_evolvable
@dataclass(frozen=True)
class MonitorState:
    """Alert/summary state of one conversation. Immutable: on_final returns a new one; stored by
    stream.core.codec next to the conversation state."""

    last_seq: int = -1  # finals with seq <= last_seq are redeliveries and are ignored
    final_count: int = 0  # finals seen (the summary's `utterances`)
    groups: tuple[Group, ...] = ()
    distribution: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] = ()  # role_or_speaker -> emotion -> count
    trajectory: Trajectory = Trajectory()  # last MAX_TRAJECTORY finals
    trajectory_truncated: bool = False
    peaks: tuple[Final, ...] = ()  # top N_PEAKS non-neutral finals by score
    alerts: tuple[AlertRef, ...] = ()  # last MAX_ALERTS alerts (raised and recovered)
    alerts_truncated: bool = False


def _who(g: Group) -> str:
    return g.role if g.role is not None else f"speaker {g.speaker}"


def _is_neutral(emotion: str) -> bool:
    return emotion.lower() == "neutral"  # MELD "neutral", EmoryNLP "Neutral"


@dataclass(frozen=True)
class _Context:
    """Where an alert comes from: the conversation, the model, the time."""

    model_id: str
    conversation_id: str
    now: float


def _alert_event(ctx: _Context, rule: str, kind: str, severity: str, g: Group, seq_from: int, seq_to: int,
                 reason: str, closes: str | None) -> dict[str, Any]:
    return {
        "alert_id": alert_id(ctx.model_id, ctx.conversation_id, rule, kind, seq_to),
        "conversation_id": ctx.conversation_id,
        "rule": rule,
        "kind": kind,
        "severity": severity,
        "role": g.role,
        "speaker": g.speaker,
        "seq_from": seq_from,
        "seq_to": seq_to,
        "reason": reason,
        "closes": closes,
        "model": model_field(ctx.model_id),
        "ts_emitted": ctx.now,
    }


def _ref(ev: dict[str, Any], speaker: bool = False) -> AlertRef:
    return AlertRef(ev["alert_id"], ev["rule"], ev["kind"], ev["severity"], ev["seq_from"], ev["seq_to"],
                    ev["speaker"] if speaker else "")


def _raise_condition(rule: Rule, last: tuple[Final, ...]) -> tuple[int, int, str] | None:
    """(seq_from, seq_to, reason tail) when `rule` (negative_streak or escalation) holds on the
    group's last finals."""
    cur = last[-1]
    if rule.kind == "negative_streak":
        recent = last[-rule.m:]
        hits = sum(rule.counts(f.emotion, f.score) for f in recent)
        if hits < rule.k:
            return None
        score = f" with score >= {rule.min_score:g}" if rule.min_score > 0 else ""
        tail = (f"{' or '.join(rule.emotions)}{score} in {hits} of the last {len(recent)} utterances "
                f"(seq {recent[0].seq}-{cur.seq})")
        return recent[0].seq, cur.seq, tail
    if rule.kind == "escalation" and len(last) >= 2:
        prev = last[-2]
        if prev.emotion in rule.from_emotions and rule.counts(cur.emotion, cur.score):
            score = f" (score {cur.score:.2f})" if rule.min_score > 0 else ""
            tail = (f"went from {prev.emotion} directly to {cur.emotion}{score} in consecutive utterances "
                    f"(seq {prev.seq}-{cur.seq})")
            return prev.seq, cur.seq, tail
    return None


def _calm_runs(rules: Sequence[Rule], g: Group, f: Final) -> dict[str, tuple[int, int]]:
    """Each recovery rule's run of finals outside its emotions, this final included."""
    calm = {n: (run, since) for n, run, since in g.calm}
    for r in rules:
        if r.kind == "recovery":
            run, since = calm.get(r.name, (0, f.seq))
            calm[r.name] = (0, f.seq) if r.counts(f.emotion, f.score) else (run + 1, since if run else f.seq)
    return calm


def _raised(rules: Sequence[Rule], g: Group, ctx: _Context) -> list[dict[str, Any]]:
    """The raising rules that hold now, minus those open or cooling down."""
    open_rules = {a.rule for a in g.open}
    last_raised = dict(g.last_raised)
    out = []
    for r in rules:
        if r.kind == "recovery" or r.name in open_rules:
            continue
        if r.name in last_raised and g.count - last_raised[r.name] < r.cooldown:
            continue
        hit = _raise_condition(r, g.last_finals)
        if hit is not None:
            seq_from, seq_to, tail = hit
            out.append(_alert_event(ctx, r.name, "raised", r.severity, g, seq_from, seq_to, f"{_who(g)}: {tail}", None))
    return out


def _recovered(rules: Sequence[Rule], g: Group, calm: dict[str, tuple[int, int]], f: Final,
               ctx: _Context) -> list[dict[str, Any]]:
    """A recovery rule whose run is long enough closes every open alert of the group: one
    "recovered" event per open alert, named after the alert's rule (consumers pair raised and
    recovered by rule, role and speaker, or exactly by `closes`)."""
    for r in rules:
        if r.kind != "recovery" or not g.open or calm[r.name][0] < r.m:
            continue
        run, since = calm[r.name]
        return [_alert_event(ctx, a.rule, "recovered", r.severity, evolve(g, speaker=a.speaker), since, f.seq,
                             f"{_who(g)}: no {' or '.join(r.emotions)} in the last {run} utterances (seq {since}-{f.seq}), "
                             f"rule {r.name}; closes the {a.severity} alert of seq {a.seq_from}-{a.seq_to}", a.alert_id)
                for a in g.open]
    return []


def _update_group(rules: Sequence[Rule], g: Group, f: Final, ctx: _Context, size: int) -> tuple[Group, list[dict[str, Any]]]:
    """One final of the group through its rules: recovery runs, raises, recoveries."""
    g = evolve(g, speaker=f.speaker, count=g.count + 1, last_seq=f.seq, last_finals=(g.last_finals + (f,))[-size:],
                negative=(g.negative + (f.emotion in negative_emotions(rules),))[-size:])
    calm = _calm_runs(rules, g, f)
    raised = _raised(rules, g, ctx)
    if raised:  # calm runs start after the latest raise
        calm = {n: (0, f.seq) for n in calm}
    g = evolve(g, open=g.open + tuple(_ref(ev, speaker=True) for ev in raised),
                last_raised=tuple({**dict(g.last_raised), **{ev["rule"]: g.count for ev in raised}}.items()))
    recovered = _recovered(rules, g, calm, f, ctx)
    g = evolve(g, open=() if recovered else g.open, calm=tuple((n, run, since) for n, (run, since) in calm.items()))
    return g, raised + recovered


def _add_count(dist, key: str, emotion: str):
    d = {k: dict(c) for k, c in dist}
    if key not in d and len(d) >= MAX_DISTRIBUTION_KEYS:
        key = OTHER_KEY
    bucket = d.setdefault(key, {})
    bucket[emotion] = bucket.get(emotion, 0) + 1
    return tuple((k, tuple(c.items())) for k, c in d.items())


def _with_final(state: MonitorState, f: Final) -> MonitorState:
    """The summary's accumulators with one more final: count, trajectory, peaks, distribution."""
    peaks = state.peaks
    if not _is_neutral(f.emotion):
        peaks = tuple(sorted(peaks + (f,), key=lambda p: (-p.score, p.seq))[:N_PEAKS])
    return evolve(state, last_seq=f.seq, final_count=state.final_count + 1, trajectory=state.trajectory.append(f),
                   trajectory_truncated=state.trajectory_truncated or len(state.trajectory) >= MAX_TRAJECTORY,
                   peaks=peaks, distribution=_add_count(state.distribution, f.role if f.role is not None else f.speaker,
                                                        f.emotion))


def _with_rules(rules: Sequence[Rule], groups: tuple[Group, ...], f: Final,
                ctx: _Context) -> tuple[tuple[Group, ...], list[dict[str, Any]]]:
    """The final's group through the rules that watch it; the group becomes the most recent one."""
    watching = rules_for(rules, f.role)
    if not watching:
        return groups, []
    key = group_key(f.role, f.speaker)
    old = next((g for g in groups if g.key == key), None)
    g, alerts = _update_group(watching, old or Group(key=key, role=f.role, speaker=f.speaker), f, ctx,
                              history_size(rules))
    return (tuple(x for x in groups if x.key != key) + (g,))[-MAX_GROUPS:], alerts


def on_final(rules: Sequence[Rule], state: MonitorState, event: dict[str, Any],
             now: float) -> tuple[MonitorState, list[dict[str, Any]]]:
    """Feed one emotion event; returns the new state and the alert events to publish (usually none).

    Only `final` events count: anything else returns (state, []) unchanged, and so does a final
    whose seq is not after the last one seen (a redelivery: finals arrive in seq order).
    """
    if event.get("status") != "final" or int(event["seq"]) <= state.last_seq:
        return state, []
    emotion = event["emotion"]
    f = Final(int(event["seq"]), event.get("role"), event["speaker"], emotion,
              float(event.get("scores", {}).get(emotion, 0.0)))
    ctx = _Context(model_id_of(event["model"]), event["conversation_id"], now)
    groups, out = _with_rules(rules, state.groups, f, ctx)
    alerts = state.alerts + tuple(_ref(ev) for ev in out)
    state = evolve(_with_final(state, f), groups=groups, alerts=alerts[-MAX_ALERTS:],
                    alerts_truncated=state.alerts_truncated or len(alerts) > MAX_ALERTS)
    return state, out
