"""Alert rules: the closed set of rule kinds, the rules file (TOML) and what the rules say is negative.

Rules come from a small TOML file (`load_rules`; the shipped `stream/rules/default.toml` is for
MELD labels, `stream/rules/emorynlp.toml` for EmoryNLP's). The rule kinds are a closed set
(evaluated in stream.core.monitor):

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

The same file decides the risk of a conversation (stream.core.risk): an emotion is negative for
a group when a rule of that group names it.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

KINDS = ("negative_streak", "escalation", "recovery")
SEVERITIES = ("info", "warning", "critical")
NO_ROLE = ("per_speaker", "ignore")
MAX_M = 50

_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


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


def _int_in_range(where: str, key: str, value: Any, lo: int, hi: int) -> int:
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
    fields.update(_numbers(where, spec, v))
    if v["severity"] not in SEVERITIES:
        raise ValueError(f"{where}: 'severity' must be one of {', '.join(SEVERITIES)}, got {v['severity']!r}")
    fields["severity"] = v["severity"]
    return Rule(**fields)


def _numbers(where: str, spec: dict, v: dict[str, Any]) -> dict[str, Any]:
    """The numeric keys of a rule's kind (m, k, min_score, cooldown), checked."""
    fields: dict[str, Any] = {}
    if "m" in spec:
        fields["m"] = _int_in_range(where, "m", v["m"], 1, MAX_M)
    if "k" in spec:
        fields["k"] = _int_in_range(where, "k", v["k"], 1, MAX_M)
        if fields["k"] > fields["m"]:
            raise ValueError(f"{where}: 'k' ({fields['k']}) must not exceed 'm' ({fields['m']})")
    if "min_score" in spec:
        ms = v["min_score"]
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not 0.0 <= ms <= 1.0:
            raise ValueError(f"{where}: 'min_score' must be a number in [0, 1], got {ms!r}")
        fields["min_score"] = float(ms)
    if "cooldown" in spec:
        fields["cooldown"] = _int_in_range(where, "cooldown", v["cooldown"], 0, 10_000)
    return fields


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
