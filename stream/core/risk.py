"""How risky a conversation looks, by the rules file: the one formula behind the summaries' `risk`
and the dashboard's ranking.

    risk = 0.6 * (largest share of negative finals among the last `history_size(rules)` finals
                  of any group the rules watch)
         + 0.4 * (weight of the most severe open alert: critical 1, warning 0.5, info or none 0)

in [0, 1], rounded to 4 places. Groups are those of the rules (stream.core.rules): a role the
rules watch, or a speaker for finals without a role. An emotion is negative for a group when a
rule watching the group names it in `emotions`, so a rules file for other labels (EmoryNLP's
"Mad") moves the risk with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from stream.core.rules import Rule

SEVERITY_WEIGHT = {"info": 0.0, "warning": 0.5, "critical": 1.0}
SHARE_WEIGHT = 0.6
ALERT_WEIGHT = 0.4


def group_key(role: str | None, speaker: str) -> str:
    """The group a final belongs to: its role, or its speaker when it has no role."""
    return f"role:{role}" if role is not None else f"speaker:{speaker}"


def rules_for(rules: Iterable[Rule], role: str | None) -> tuple[Rule, ...]:
    """The rules that watch finals with this role (None: finals without one)."""
    return tuple(r for r in rules if r.applies(role))


def history_size(rules: Iterable[Rule]) -> int:
    """How many recent finals of a group the rules look at (the longest streak window, at least 2)."""
    return max([2] + [r.m for r in rules if r.kind == "negative_streak"])


def negative_emotions(rules: Iterable[Rule]) -> frozenset[str]:
    """The emotions these rules look for."""
    return frozenset(e for r in rules for e in r.emotions)


def risk_score(negative_shares: Iterable[float], open_severities: Iterable[str]) -> float:
    share = max(negative_shares, default=0.0)
    severity = max((SEVERITY_WEIGHT.get(s, 0.0) for s in open_severities), default=0.0)
    return round(min(1.0, SHARE_WEIGHT * share + ALERT_WEIGHT * severity), 4)


def negative_shares(rules: Sequence[Rule], finals: Iterable[tuple[str | None, str, str]]) -> dict[str, float]:
    """Per group, the share of negative finals among its last `history_size(rules)` finals.

    `finals`: (role, speaker, emotion) in seq order. The monitor keeps the same window per group
    as finals arrive (stream.core.monitor); this computes it from a list of finals (the dashboard)."""
    size = history_size(rules)
    flags: dict[str, list[bool]] = {}
    for role, speaker, emotion in finals:
        watching = rules_for(rules, role)
        if watching:
            flags.setdefault(group_key(role, speaker), []).append(emotion in negative_emotions(watching))
    return {key: sum(f[-size:]) / len(f[-size:]) for key, f in flags.items()}
