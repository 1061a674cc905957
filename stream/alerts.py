"""Alert rules and conversation summaries over `final` emotion events, as pure functions.

No Kafka, no Redis: the worker keeps one `MonitorState` per conversation next to the stream
state, feeds it every `final` event it emits (`on_final`), publishes the alert events returned,
and publishes `summarize(...)` when the conversation ends (end message or idle timeout).

Rules come from a small TOML file (`load_rules`; the shipped `stream/rules/default.toml` is for
MELD labels). The rule kinds are a closed set implemented here:

- `negative_streak`: at least `k` of the last `m` finals of a role have an emotion in `emotions`
  (with score >= `min_score`) -> alert "raised".
- `escalation`: two consecutive finals of a role go from an emotion in `from_emotions` directly
  to one in `emotions` (score >= `min_score`) -> alert "raised".
- `recovery`: the role has open alerts and its last `m` finals are all outside `emotions`
  -> every open alert of the role is closed by a "recovered" event of its own, carrying the
  closed alert's rule name, role and speaker and its alert_id in `closes` (the recovery rule's
  name is in the reason).

Grouping: a rule watches the finals of each role in `roles` separately; finals with a null role
are grouped per speaker (`no_role = "per_speaker"`, the default) or skipped (`"ignore"`). Counts
("k of the last m", "consecutive", cooldowns) are over the finals of that group only.

Storm control: a raising rule does not raise again for a group while its alert is open, and not
before `cooldown` further finals of the group have passed since it last raised. A group without
a recovery rule keeps its alerts open until the conversation ends.

State is bounded: per group a window of the last max(m) finals and a few counters; at most
MAX_GROUPS groups (the least recently active one is dropped beyond that) and MAX_DISTRIBUTION_KEYS
keys in the distribution; the alert list keeps the last MAX_ALERTS alerts; the trajectory keeps
the last MAX_TRAJECTORY finals (the one part of the state that grows with the conversation, up
to that cap; the summary says `trajectory_truncated`). The trajectory is packed into a few byte
strings (`Trajectory`), so a final costs the same to add, store and load at position 5 as at 500.
"""

from __future__ import annotations

import base64
import hashlib
import re
import struct
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from importlib.resources import files
from pathlib import Path
from typing import Any

KINDS = ("negative_streak", "escalation", "recovery")
SEVERITIES = ("info", "warning", "critical")
NO_ROLE = ("per_speaker", "ignore")

MAX_TRAJECTORY = 500
MAX_ALERTS = 100
MAX_GROUPS = 64
MAX_DISTRIBUTION_KEYS = 64
OTHER_KEY = "(other)"  # distribution bucket for groups beyond MAX_DISTRIBUTION_KEYS
MAX_M = 50
N_PEAKS = 3
STATE_VERSION = 2  # 2: packed trajectory (1 is still read)

# risk(): weight of the open alert with the highest severity
_SEVERITY_WEIGHT = {"info": 0.0, "warning": 0.5, "critical": 1.0}

_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


# --------------------------------------------------------------------------------------------
# Rules


@dataclass(frozen=True)
class Rule:
    """One rule instance from a rules file (see the module docstring for the kinds)."""

    name: str
    kind: str
    emotions: tuple[str, ...]
    roles: tuple[str, ...] = ("customer",)
    no_role: str = "per_speaker"
    from_emotions: tuple[str, ...] = ()  # escalation only
    k: int = 0  # negative_streak only
    m: int = 0  # negative_streak, recovery
    min_score: float = 0.0  # negative_streak, escalation
    severity: str = "warning"
    cooldown: int = 0  # negative_streak, escalation

    def applies(self, role: str | None) -> bool:
        if role is None:
            return self.no_role == "per_speaker"
        return role in self.roles

    def counts(self, emotion: str, score: float) -> bool:
        """Whether a final with this emotion/score is one this rule looks for."""
        return emotion in self.emotions and score >= self.min_score


# key -> (required, default) per kind; "name" and "kind" are required everywhere
_COMMON = {"name": (True, None), "kind": (True, None), "roles": (False, ("customer",)),
           "no_role": (False, "per_speaker")}
_KIND_KEYS: dict[str, dict[str, tuple[bool, Any]]] = {
    "negative_streak": {**_COMMON, "emotions": (True, None), "k": (True, None), "m": (True, None),
                        "min_score": (False, 0.0), "severity": (False, "warning"), "cooldown": (False, 5)},
    "escalation": {**_COMMON, "from_emotions": (True, None), "emotions": (True, None),
                   "min_score": (False, 0.0), "severity": (False, "warning"), "cooldown": (False, 5)},
    "recovery": {**_COMMON, "emotions": (True, None), "m": (True, None), "severity": (False, "info")},
}
_TOP_KEYS = ("labels", "rule")


def default_rules_path(labels: Sequence[str] | None = None):
    """The shipped rules file for a label set (MELD's by default; EmoryNLP's has its own),
    as an importlib.resources Traversable."""
    if labels is not None and "Mad" in labels:
        return files("stream").joinpath("rules", "emorynlp.toml")
    return files("stream").joinpath("rules", "default.toml")


def _str_list(where: str, key: str, value: Any, allow_empty: bool = False) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{where}: '{key}' must be a list of non-empty strings, got {value!r}")
    if not value and not allow_empty:
        raise ValueError(f"{where}: '{key}' must not be empty")
    return tuple(value)


def _int(where: str, key: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{where}: '{key}' must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _parse_rule(src: str, i: int, raw: Any, labels: tuple[str, ...] | None) -> Rule:
    where = f"{src}: rule #{i + 1}"
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: must be a table ([[rule]]), got {type(raw).__name__}")  # noqa: TRY004
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"{where}: 'name' is required: 1-64 characters of letters, digits, '_', '.', '-' (got {name!r})")
    where = f"{src}: rule #{i + 1} ({name})"
    kind = raw.get("kind")
    if kind not in _KIND_KEYS:
        raise ValueError(f"{where}: unknown kind {kind!r} in key 'kind'; known kinds: {', '.join(KINDS)}")
    spec = _KIND_KEYS[kind]
    for key in raw:
        if key not in spec:
            raise ValueError(f"{where}: unknown key {key!r} for kind {kind!r}; allowed keys: {', '.join(spec)}")
    for key, (required, _) in spec.items():
        if required and key not in raw:
            raise ValueError(f"{where}: missing required key {key!r} for kind {kind!r}")
    v = {key: raw.get(key, default) for key, (_, default) in spec.items()}

    fields: dict[str, Any] = {"name": name, "kind": kind}
    roles = v["roles"]
    fields["roles"] = _str_list(where, "roles", list(roles) if isinstance(roles, tuple) else roles)
    if v["no_role"] not in NO_ROLE:
        raise ValueError(f"{where}: 'no_role' must be one of {', '.join(NO_ROLE)}, got {v['no_role']!r}")
    fields["no_role"] = v["no_role"]
    fields["emotions"] = _str_list(where, "emotions", v["emotions"])
    if kind == "escalation":
        fields["from_emotions"] = _str_list(where, "from_emotions", v["from_emotions"])
    if labels is not None:
        for key in ("emotions", "from_emotions"):
            unknown = [e for e in fields.get(key, ()) if e not in labels]
            if unknown:
                raise ValueError(f"{where}: '{key}' names {', '.join(map(repr, unknown))}, not in the file's "
                                 f"labels ({', '.join(labels)})")
    if "m" in spec:
        fields["m"] = _int(where, "m", v["m"], 1, MAX_M)
    if "k" in spec:
        fields["k"] = _int(where, "k", v["k"], 1, MAX_M)
        if fields["k"] > fields["m"]:
            raise ValueError(f"{where}: 'k' ({fields['k']}) must not exceed 'm' ({fields['m']})")
    if "min_score" in spec:
        ms = v["min_score"]
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not 0.0 <= ms <= 1.0:
            raise ValueError(f"{where}: 'min_score' must be a number in [0, 1], got {ms!r}")
        fields["min_score"] = float(ms)
    if "cooldown" in spec:
        fields["cooldown"] = _int(where, "cooldown", v["cooldown"], 0, 10_000)
    if v["severity"] not in SEVERITIES:
        raise ValueError(f"{where}: 'severity' must be one of {', '.join(SEVERITIES)}, got {v['severity']!r}")
    fields["severity"] = v["severity"]
    return Rule(**fields)


def load_rules(path: str | Path | None = None, labels: Sequence[str] | None = None) -> tuple[Rule, ...]:
    """Rules from a TOML file (None = the shipped file for `labels`: MELD's by default).

    Raises ValueError naming the file and the offending key on anything it does not understand:
    unknown top-level keys, unknown rule keys or kinds, wrong types, duplicate names, emotions
    outside the file's optional `labels` list.
    """
    if path is None:
        res = default_rules_path(labels)
        src, text = f"stream/rules/{res.name}", res.read_text(encoding="utf-8")
    else:
        src = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"{src}: cannot read rules file: {exc}") from exc
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{src}: not valid TOML: {exc}") from exc
    for key in doc:
        if key not in _TOP_KEYS:
            raise ValueError(f"{src}: unknown top-level key {key!r}; allowed: {', '.join(_TOP_KEYS)} "
                             "(rules go in [[rule]] tables)")
    labels = None
    if "labels" in doc:
        labels = _str_list(f"{src}", "labels", doc["labels"])
    raw_rules = doc.get("rule", [])
    if not isinstance(raw_rules, list):
        raise ValueError(f"{src}: 'rule' must be an array of tables ([[rule]])")  # noqa: TRY004
    rules = tuple(_parse_rule(src, i, r, labels) for i, r in enumerate(raw_rules))
    seen: set[str] = set()
    for r in rules:
        if r.name in seen:
            raise ValueError(f"{src}: duplicate rule name {r.name!r} (key 'name')")
        seen.add(r.name)
    return rules


def check_labels(rules: Iterable[Rule], labels: Sequence[str]) -> None:
    """Raise ValueError unless every emotion the rules name is one of the model's `labels`.

    For the worker at start-up: a rules file is per label set (MELD's "anger" is EmoryNLP's "Mad").
    """
    known = set(labels)
    bad = sorted({e for r in rules for e in (*r.emotions, *r.from_emotions) if e not in known})
    if bad:
        raise ValueError(f"alert rules name emotions the model does not have: {', '.join(bad)} "
                         f"(model labels: {', '.join(labels)}); use a rules file for this label set")


# --------------------------------------------------------------------------------------------
# State


@dataclass(frozen=True)
class Final:
    """One final as the monitor keeps it (no text)."""

    seq: int
    role: str | None
    speaker: str
    emotion: str
    score: float  # score of `emotion`

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "role": self.role, "speaker": self.speaker, "emotion": self.emotion, "score": self.score}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Final:
        return cls(int(d["seq"]), d["role"], d["speaker"], d["emotion"], float(d["score"]))


def _table_index(table: tuple, item) -> tuple[tuple, int]:
    try:
        return table, table.index(item)
    except ValueError:
        return table + (item,), len(table)


@dataclass(frozen=True)
class Trajectory:
    """The last MAX_TRAJECTORY finals, packed column-wise into immutable byte strings.

    A tuple of `Final`s cost a Python object per final to build, store and load on every
    utterance (the state grew to 100 KB of JSON and the step three times slower by position 250);
    packed, adding a final is a few byte-string copies and the state holds 16 bytes per final
    (about 22 in the JSON).
    """

    seq: bytes = b""  # int64 little-endian, one per final
    score: bytes = b""  # float32
    who: bytes = b""  # uint16 index into `people`
    emotion: bytes = b""  # uint16 index into `emotions`
    people: tuple[tuple[str | None, str], ...] = ()  # (role, speaker)
    emotions: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.seq) // 8

    def append(self, f: Final, cap: int = MAX_TRAJECTORY) -> Trajectory:
        people, who = _table_index(self.people, (f.role, f.speaker))
        emotions, emo = _table_index(self.emotions, f.emotion)
        t = Trajectory(self.seq + struct.pack("<q", f.seq), self.score + struct.pack("<f", f.score),
                       self.who + struct.pack("<H", who), self.emotion + struct.pack("<H", emo), people, emotions)
        if len(t) > cap:
            t = Trajectory(t.seq[-8 * cap:], t.score[-4 * cap:], t.who[-2 * cap:], t.emotion[-2 * cap:], people, emotions)
        if len(people) + len(emotions) > 2 * cap:  # many one-off speakers: drop table entries no final uses
            t = Trajectory.of(t.finals())
        return t

    @classmethod
    def of(cls, finals: Iterable[Final]) -> Trajectory:
        t = cls()
        for f in finals:
            t = t.append(f)
        return t

    def finals(self) -> list[Final]:
        seqs = struct.unpack(f"<{len(self)}q", self.seq)
        scores = struct.unpack(f"<{len(self)}f", self.score)
        whos = struct.unpack(f"<{len(self)}H", self.who)
        emos = struct.unpack(f"<{len(self)}H", self.emotion)
        # float32 storage: rounded to 5 places, like the scores in the emotion events
        return [Final(q, *self.people[w], self.emotions[e], round(sc, 5)) for q, sc, w, e in zip(seqs, scores, whos, emos)]

    def to_dict(self) -> dict[str, Any]:
        b64 = base64.b64encode
        return {"seq": b64(self.seq).decode(), "score": b64(self.score).decode(), "who": b64(self.who).decode(),
                "emotion": b64(self.emotion).decode(), "people": [list(p) for p in self.people],
                "emotions": list(self.emotions)}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | list) -> Trajectory:
        if isinstance(d, list):  # state version 1: a list of finals
            return cls.of(Final.from_dict(f) for f in d)
        b64 = base64.b64decode
        return cls(b64(d["seq"]), b64(d["score"]), b64(d["who"]), b64(d["emotion"]),
                   tuple((r, s) for r, s in d["people"]), tuple(d["emotions"]))


@dataclass(frozen=True)
class AlertRef:
    """An alert as recorded in the state (and listed in the summary)."""

    alert_id: str
    rule: str
    kind: str
    severity: str
    seq_from: int
    seq_to: int
    speaker: str = ""  # kept for open alerts: their recovery names the same speaker

    def to_dict(self) -> dict[str, Any]:
        """The summary's view (no speaker)."""
        return {"alert_id": self.alert_id, "rule": self.rule, "kind": self.kind, "severity": self.severity,
                "seq_from": self.seq_from, "seq_to": self.seq_to}

    def state_dict(self) -> dict[str, Any]:
        return {**self.to_dict(), "speaker": self.speaker}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AlertRef:
        return cls(d["alert_id"], d["rule"], d["kind"], d["severity"], int(d["seq_from"]), int(d["seq_to"]),
                   d.get("speaker", ""))


@dataclass(frozen=True)
class Group:
    """Rule state of one role (or, for null roles, one speaker) in one conversation."""

    key: str  # "role:<role>" or "speaker:<speaker>"
    role: str | None
    speaker: str  # last speaker seen in the group
    count: int = 0  # finals of the group so far (cooldowns count these)
    last_seq: int = -1
    window: tuple[Final, ...] = ()  # last max(m) finals of the group
    negative: tuple[bool, ...] = ()  # parallel to window: emotion named by a rule of the group (for risk)
    last_raised: tuple[tuple[str, int], ...] = ()  # rule name -> group count when it last raised
    calm: tuple[tuple[str, int, int], ...] = ()  # recovery rule -> (run of non-negative finals, seq it began)
    open: tuple[AlertRef, ...] = ()  # raised alerts not yet recovered

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "role": self.role, "speaker": self.speaker, "count": self.count,
                "last_seq": self.last_seq, "window": [f.to_dict() for f in self.window],
                "negative": list(self.negative), "last_raised": {n: c for n, c in self.last_raised},
                "calm": {n: [run, since] for n, run, since in self.calm},
                "open": [a.state_dict() for a in self.open]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Group:
        return cls(key=d["key"], role=d["role"], speaker=d["speaker"], count=int(d["count"]),
                   last_seq=int(d["last_seq"]), window=tuple(Final.from_dict(f) for f in d["window"]),
                   negative=tuple(bool(x) for x in d["negative"]),
                   last_raised=tuple((n, int(c)) for n, c in d["last_raised"].items()),
                   calm=tuple((n, int(v[0]), int(v[1])) for n, v in d["calm"].items()),
                   open=tuple(AlertRef.from_dict(a) for a in d["open"]))


@dataclass(frozen=True)
class MonitorState:
    """Alert/summary state of one conversation. Immutable: on_final returns a new one.

    `to_dict()` is JSON-able and `from_dict(to_dict())` gives an equal state, so the worker can
    store it next to the stream state (e.g. in Redis).
    """

    last_seq: int = -1  # finals with seq <= last_seq are redeliveries and are ignored
    utterances: int = 0  # finals seen
    groups: tuple[Group, ...] = ()
    distribution: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] = ()  # role_or_speaker -> emotion -> count
    trajectory: Trajectory = Trajectory()  # last MAX_TRAJECTORY finals
    trajectory_truncated: bool = False
    peaks: tuple[Final, ...] = ()  # top N_PEAKS non-neutral finals by score
    alerts: tuple[AlertRef, ...] = ()  # last MAX_ALERTS alerts (raised and recovered)
    alerts_truncated: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": STATE_VERSION,
            "last_seq": self.last_seq,
            "utterances": self.utterances,
            "groups": [g.to_dict() for g in self.groups],
            "distribution": {k: dict(c) for k, c in self.distribution},
            "trajectory": self.trajectory.to_dict(),
            "trajectory_truncated": self.trajectory_truncated,
            "peaks": [f.to_dict() for f in self.peaks],
            "alerts": [a.to_dict() for a in self.alerts],
            "alerts_truncated": self.alerts_truncated,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MonitorState:
        if d.get("v") not in (1, STATE_VERSION):
            raise ValueError(f"unsupported MonitorState version {d.get('v')!r} (expected {STATE_VERSION})")
        return cls(
            last_seq=int(d["last_seq"]),
            utterances=int(d["utterances"]),
            groups=tuple(Group.from_dict(g) for g in d["groups"]),
            distribution=tuple((k, tuple((e, int(n)) for e, n in c.items())) for k, c in d["distribution"].items()),
            trajectory=Trajectory.from_dict(d["trajectory"]),
            trajectory_truncated=bool(d["trajectory_truncated"]),
            peaks=tuple(Final.from_dict(f) for f in d["peaks"]),
            alerts=tuple(AlertRef.from_dict(a) for a in d["alerts"]),
            alerts_truncated=bool(d["alerts_truncated"]),
        )


# --------------------------------------------------------------------------------------------
# Rule evaluation


def _model_id(model: dict[str, Any]) -> str:
    return f"{model['name']}@{model['version']}"


def alert_id(model: dict[str, Any], conversation_id: str, rule: str, kind: str, seq_to: int) -> str:
    raw = f"{_model_id(model)}\x1f{conversation_id}\x1f{rule}\x1f{kind}\x1f{seq_to}"
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def summary_id(model: dict[str, Any], conversation_id: str) -> str:
    raw = f"{_model_id(model)}\x1f{conversation_id}\x1fsummary"
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def _who(g: Group) -> str:
    return g.role if g.role is not None else f"speaker {g.speaker}"


def _is_neutral(emotion: str) -> bool:
    return emotion.lower() == "neutral"  # MELD "neutral", EmoryNLP "Neutral"


def _alert_event(model, cid, rule: Rule, kind: str, severity: str, g: Group, seq_from: int, seq_to: int,
                 reason: str, closes: str | None, now: float) -> dict[str, Any]:
    return {
        "alert_id": alert_id(model, cid, rule.name, kind, seq_to),
        "conversation_id": cid,
        "rule": rule.name,
        "kind": kind,
        "severity": severity,
        "role": g.role,
        "speaker": g.speaker,
        "seq_from": seq_from,
        "seq_to": seq_to,
        "reason": reason,
        "closes": closes,
        "model": {"name": model["name"], "version": model["version"]},
        "ts_emitted": now,
    }


def _ref(ev: dict[str, Any], speaker: bool = False) -> AlertRef:
    return AlertRef(ev["alert_id"], ev["rule"], ev["kind"], ev["severity"], ev["seq_from"], ev["seq_to"],
                    ev["speaker"] if speaker else "")


def _raise_condition(rule: Rule, window: tuple[Final, ...]) -> tuple[int, int, str] | None:
    """(seq_from, seq_to, reason tail) when `rule` (negative_streak or escalation) holds on `window`."""
    cur = window[-1]
    if rule.kind == "negative_streak":
        recent = window[-rule.m:]
        hits = sum(rule.counts(f.emotion, f.score) for f in recent)
        if hits < rule.k:
            return None
        score = f" with score >= {rule.min_score:g}" if rule.min_score > 0 else ""
        tail = (f"{' or '.join(rule.emotions)}{score} in {hits} of the last {len(recent)} utterances "
                f"(seq {recent[0].seq}-{cur.seq})")
        return recent[0].seq, cur.seq, tail
    if rule.kind == "escalation":
        if len(window) < 2:
            return None
        prev = window[-2]
        if prev.emotion in rule.from_emotions and rule.counts(cur.emotion, cur.score):
            score = f" (score {cur.score:.2f})" if rule.min_score > 0 else ""
            tail = (f"went from {prev.emotion} directly to {cur.emotion}{score} in consecutive utterances "
                    f"(seq {prev.seq}-{cur.seq})")
            return prev.seq, cur.seq, tail
        return None
    return None


def _update_group(rules: Sequence[Rule], g: Group, f: Final, model, cid: str, now: float,
                  window_size: int) -> tuple[Group, list[dict[str, Any]]]:
    window = (g.window + (f,))[-window_size:]
    neg_emotions = {e for r in rules for e in r.emotions}
    negative = (g.negative + (f.emotion in neg_emotions,))[-window_size:]
    count = g.count + 1
    last_raised = dict(g.last_raised)
    calm = {n: (run, since) for n, run, since in g.calm}
    open_alerts = list(g.open)
    g = replace(g, speaker=f.speaker, count=count, last_seq=f.seq, window=window, negative=negative)
    out: list[dict[str, Any]] = []

    # 1. recovery runs include this final
    for r in rules:
        if r.kind == "recovery":
            run, since = calm.get(r.name, (0, f.seq))
            calm[r.name] = (0, f.seq) if r.counts(f.emotion, f.score) else (run + 1, since if run else f.seq)

    # 2. raising rules
    open_rules = {a.rule for a in open_alerts}
    for r in rules:
        if r.kind == "recovery" or r.name in open_rules:
            continue
        last = last_raised.get(r.name)
        if last is not None and count - last < r.cooldown:
            continue
        hit = _raise_condition(r, window)
        if hit is None:
            continue
        seq_from, seq_to, tail = hit
        ev = _alert_event(model, cid, r, "raised", r.severity, g, seq_from, seq_to, f"{_who(g)}: {tail}", None, now)
        out.append(ev)
        open_alerts.append(_ref(ev, speaker=True))
        last_raised[r.name] = count
    if out:  # calm runs start after the latest raise
        calm = {n: (0, f.seq) for n in calm}

    # 3. recovery closes all open alerts of the group: one "recovered" event per open alert,
    #    named after the alert's rule (consumers pair raised/recovered by rule, role and speaker,
    #    or exactly by `closes`)
    for r in rules:
        if r.kind != "recovery" or not open_alerts:
            continue
        run, since = calm[r.name]
        if run < r.m:
            continue
        for a in open_alerts:
            closed_rule = replace(r, name=a.rule)
            reason = (f"{_who(g)}: no {' or '.join(r.emotions)} in the last {run} utterances (seq {since}-{f.seq}), "
                      f"rule {r.name}; closes the {a.severity} alert of seq {a.seq_from}-{a.seq_to}")
            closed_group = replace(g, speaker=a.speaker)
            out.append(_alert_event(model, cid, closed_rule, "recovered", r.severity, closed_group, since, f.seq,
                                    reason, a.alert_id, now))
        open_alerts = []

    g = replace(g, last_raised=tuple(last_raised.items()),
                calm=tuple((n, run, since) for n, (run, since) in calm.items()), open=tuple(open_alerts))
    return g, out


def _add_count(dist, key: str, emotion: str):
    d = {k: dict(c) for k, c in dist}
    if key not in d and len(d) >= MAX_DISTRIBUTION_KEYS:
        key = OTHER_KEY
    bucket = d.setdefault(key, {})
    bucket[emotion] = bucket.get(emotion, 0) + 1
    return tuple((k, tuple(c.items())) for k, c in d.items())


def on_final(rules: Sequence[Rule], state: MonitorState, event: dict[str, Any],
             now: float) -> tuple[MonitorState, list[dict[str, Any]]]:
    """Feed one emotion event; returns the new state and the alert events to publish (usually none).

    Only `final` events count: anything else returns (state, []) unchanged, and so does a final
    whose seq is not after the last one seen (a redelivery: finals arrive in seq order).
    """
    if event.get("status") != "final":
        return state, []
    seq = int(event["seq"])
    if seq <= state.last_seq:
        return state, []
    cid = event["conversation_id"]
    model = event["model"]
    role = event.get("role")
    speaker = event["speaker"]
    emotion = event["emotion"]
    score = float(event.get("scores", {}).get(emotion, 0.0))
    f = Final(seq, role, speaker, emotion, score)

    # summary parts
    truncated = state.trajectory_truncated or len(state.trajectory) >= MAX_TRAJECTORY
    trajectory = state.trajectory.append(f)
    peaks = state.peaks
    if not _is_neutral(emotion):
        peaks = tuple(sorted(peaks + (f,), key=lambda p: (-p.score, p.seq))[:N_PEAKS])
    distribution = _add_count(state.distribution, role if role is not None else speaker, emotion)

    # rules
    out: list[dict[str, Any]] = []
    groups = list(state.groups)
    applicable = [r for r in rules if r.applies(role)]
    if applicable:
        key = f"role:{role}" if role is not None else f"speaker:{speaker}"
        window_size = max([2] + [r.m for r in rules if r.kind == "negative_streak"])
        idx = next((i for i, g in enumerate(groups) if g.key == key), None)
        g = groups.pop(idx) if idx is not None else Group(key=key, role=role, speaker=speaker)
        g, out = _update_group(applicable, g, f, model, cid, now, window_size)
        groups.append(g)  # most recently active last
        if len(groups) > MAX_GROUPS:
            groups = groups[-MAX_GROUPS:]

    alerts = state.alerts + tuple(_ref(ev) for ev in out)
    alerts_truncated = state.alerts_truncated or len(alerts) > MAX_ALERTS
    new = MonitorState(
        last_seq=seq,
        utterances=state.utterances + 1,
        groups=tuple(groups),
        distribution=distribution,
        trajectory=trajectory,
        trajectory_truncated=truncated,
        peaks=peaks,
        alerts=alerts[-MAX_ALERTS:],
        alerts_truncated=alerts_truncated,
    )
    return new, out


def risk(state: MonitorState) -> float:
    """Risk score in [0, 1] for sorting conversations in a dashboard.

    0.6 * (largest share of "negative" finals, i.e. with an emotion some rule of the group names,
    among the last max(m) finals of any watched role/speaker) + 0.4 * (weight of the most severe
    open alert: critical 1, warning 0.5, none or info 0).
    """
    share = 0.0
    severity = 0.0
    for g in state.groups:
        if g.negative:
            share = max(share, sum(g.negative) / len(g.negative))
        for a in g.open:
            severity = max(severity, _SEVERITY_WEIGHT.get(a.severity, 0.0))
    return round(min(1.0, 0.6 * share + 0.4 * severity), 4)


ENDED_BY = ("end", "abandoned", "idle")


def summarize(state: MonitorState, conversation_id: str, ended_by: str, model: dict[str, Any],
              now: float) -> dict[str, Any]:
    """The summary event of a conversation that ended (`ended_by`: "end" message, or "abandoned":
    no utterance for the abandonment timeout; "idle" is what releases before it wrote for an idle
    timeout, which now only flushes)."""
    if ended_by not in ENDED_BY:
        raise ValueError(f"ended_by must be one of {', '.join(ENDED_BY)}, got {ended_by!r}")
    return {
        "summary_id": summary_id(model, conversation_id),
        "conversation_id": conversation_id,
        "ended_by": ended_by,
        "utterances": state.utterances,
        "distribution": {k: dict(c) for k, c in state.distribution},
        "trajectory": [f.to_dict() for f in state.trajectory.finals()],
        "trajectory_truncated": state.trajectory_truncated,
        "peaks": [f.to_dict() for f in state.peaks],
        "alerts": [a.to_dict() for a in state.alerts],
        "alerts_truncated": state.alerts_truncated,
        "open_alerts": [a.alert_id for g in state.groups for a in g.open],
        "risk": risk(state),
        "model": {"name": model["name"], "version": model["version"]},
        "ts_emitted": now,
    }
