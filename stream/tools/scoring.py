"""How well the monitor did on a replayed file: delivery, accuracy and latency, from what was sent
and what came back on `emotions`. Pure (no Kafka, no model): `replay --score` and
`demo --score` feed it; the tests feed it hand-made events.

- `sent`: the utterances this replay produced (conversation id, seq, the `ts` stamped at send
  time, the gold label when the file has one).
- `received`: (time the consumer read it, event) pairs from `emotions`. Only events of this replay
  count: same (conversation_id, seq) *and* `ts_produced` equal to the `ts` this replay stamped, so
  events left on the topic by earlier runs are ignored.

F1 is computed as `emotion-monitor evaluate` computes it (model.training.evaluate.metrics_from_probs:
sklearn's f1_score over the model's label indices, zero_division=0, in percent rounded to 2
places), over the labelled utterances that got that kind of event; an utterance with no final
is counted in `lost`, not as a wrong answer. The prediction is the argmax of the event's scores.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

REPORT_KEYS = ("sent", "finals", "lost", "duplicate_final_ids", "weighted_f1_final", "weighted_f1_provisional",
               "macro_f1_final", "provisional_changed_share", "latency_provisional_p50_ms",
               "latency_provisional_p99_ms", "latency_final_p50_ms", "latency_final_p99_ms")
TS_TOLERANCE_S = 1e-6  # ts survives the JSON round trip exactly; this only absorbs float printing


@dataclass(frozen=True)
class SentUtterance:
    conversation_id: str
    seq: int
    ts: float
    gold_label: str | None = None


def f1_percent(gold: Sequence[int], pred: Sequence[int], n_labels: int, average: str) -> float | None:
    """sklearn's F1 the way model.training.evaluate.metrics_from_probs reports it (None without data)."""
    if len(gold) == 0:
        return None
    from sklearn.metrics import f1_score

    ids = list(range(n_labels))
    return round(100 * float(f1_score(gold, pred, labels=ids, average=average, zero_division=0)), 2)


def _percentiles(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    p50, p99 = np.percentile(values, [50, 99])
    return round(float(p50), 1), round(float(p99), 1)


def _argmax(scores: dict, labels: Sequence[str]) -> int:
    return int(np.argmax([float(scores.get(lab, float("-inf"))) for lab in labels]))


@dataclass
class _FirstEvents:
    """Per utterance of this replay, the first provisional and the first final received (with the
    time read), and what did not count."""

    first_provisional: dict[tuple[str, int], tuple[float, dict]] = field(default_factory=dict)
    first_final: dict[tuple[str, int], tuple[float, dict]] = field(default_factory=dict)
    final_ids: dict[tuple[str, int], set[str]] = field(default_factory=dict)
    duplicate_final_ids: int = 0
    ignored: int = 0
    labels: list[str] | None = None


def _first_events(by_key: dict[tuple[str, int], SentUtterance], received: Iterable[tuple[float, dict]],
                  labels: Sequence[str] | None) -> _FirstEvents:
    out = _FirstEvents(labels=list(labels) if labels is not None else None)
    seen_final_ids: set[str] = set()
    for t_recv, ev in received:
        key = (ev.get("conversation_id"), ev.get("seq"))
        s = by_key.get(key)
        ts = ev.get("ts_produced")
        if s is None or not isinstance(ts, (int, float)) or abs(ts - s.ts) > TS_TOLERANCE_S:
            out.ignored += 1  # another run's event, or a conversation this replay did not send
            continue
        if out.labels is None and isinstance(ev.get("scores"), dict):
            out.labels = list(ev["scores"])
        status = ev.get("status")
        if status == "provisional":
            out.first_provisional.setdefault(key, (t_recv, ev))
        elif status == "final":
            eid = ev.get("event_id")
            if eid in seen_final_ids:
                out.duplicate_final_ids += 1  # a redelivered final: consumers de-duplicate on event_id
            seen_final_ids.add(eid)
            out.final_ids.setdefault(key, set()).add(eid)
            out.first_final.setdefault(key, (t_recv, ev))
    return out


def _f1s(first: dict, by_key: dict, labels: list[str]) -> tuple[float | None, float | None, int]:
    """(weighted-F1, macro-F1, utterances scored) of the events in `first` against the gold labels."""
    index = {lab.lower(): i for i, lab in enumerate(labels)}
    gold, pred = [], []
    for key, (_, ev) in first.items():
        s = by_key[key]
        if s.gold_label is None or s.gold_label.lower() not in index or not isinstance(ev.get("scores"), dict):
            continue
        gold.append(index[s.gold_label.lower()])
        pred.append(_argmax(ev["scores"], labels))
    return f1_percent(gold, pred, len(labels), "weighted"), f1_percent(gold, pred, len(labels), "macro"), len(gold)


def score_replay(sent: Iterable[SentUtterance], received: Iterable[tuple[float, dict]],
                 labels: Sequence[str] | None = None) -> dict:
    """The report (keys REPORT_KEYS plus details). `labels`: the model's label order; default: the
    key order of the first event's `scores` (the worker writes them in the model's order)."""
    sent = list(sent)
    by_key = {(s.conversation_id, s.seq): s for s in sent}
    first = _first_events(by_key, received, labels)
    labels = first.labels or []
    known = {lab.lower() for lab in labels}
    wf1_final, mf1_final, n_final = _f1s(first.first_final, by_key, labels)
    wf1_prov, mf1_prov, n_prov = _f1s(first.first_provisional, by_key, labels)
    both = [k for k in first.first_final if k in first.first_provisional]
    changed = sum(first.first_provisional[k][1].get("emotion") != first.first_final[k][1].get("emotion") for k in both)
    p50p, p99p = _percentiles([(t - by_key[k].ts) * 1000.0 for k, (t, _) in first.first_provisional.items()])
    p50f, p99f = _percentiles([(t - by_key[k].ts) * 1000.0 for k, (t, _) in first.first_final.items()])
    return {
        "sent": len(sent),
        "finals": len(first.first_final),
        "lost": len(by_key.keys() - first.first_final.keys()),
        "duplicate_final_ids": first.duplicate_final_ids,
        "weighted_f1_final": wf1_final,
        "weighted_f1_provisional": wf1_prov,
        "macro_f1_final": mf1_final,
        "provisional_changed_share": round(changed / len(both), 4) if both else None,
        "latency_provisional_p50_ms": p50p,
        "latency_provisional_p99_ms": p99p,
        "latency_final_p50_ms": p50f,
        "latency_final_p99_ms": p99f,
        # details
        "macro_f1_provisional": mf1_prov,
        "provisionals": len(first.first_provisional),
        "labelled": sum(s.gold_label is not None for s in sent),
        "scored_final": n_final,
        "scored_provisional": n_prov,
        "gold_not_in_model_labels": sorted({s.gold_label for s in sent
                                            if s.gold_label is not None and s.gold_label.lower() not in known}),
        "several_final_ids": sum(len(ids) > 1 for ids in first.final_ids.values()),
        "ignored_events": first.ignored,
        "labels": labels,
    }


def format_report(report: dict) -> list[str]:
    """Human-readable lines of a report (the JSON object carries the same numbers)."""
    def num(v, fmt="{:.2f}"):
        return "n/a" if v is None else fmt.format(v)

    lines = [f"sent {report['sent']} utterances, {report['finals']} finals received, {report['lost']} lost, "
             f"{report['duplicate_final_ids']} duplicate final ids"]
    if report["scored_final"] or report["scored_provisional"]:
        lines.append(f"weighted-F1 final {num(report['weighted_f1_final'])}, provisional "
                     f"{num(report['weighted_f1_provisional'])}; macro-F1 final {num(report['macro_f1_final'])} "
                     f"({report['scored_final']} labelled finals)")
    else:
        lines.append("no gold labels in the file: accuracy not scored")
    if report["gold_not_in_model_labels"]:
        lines.append(f"gold labels the model does not know (not scored): {', '.join(report['gold_not_in_model_labels'])}")
    lines.append(f"provisional label changed before its final: {num(report['provisional_changed_share'], '{:.1%}')}")
    lines.append(f"latency produce -> provisional p50 {num(report['latency_provisional_p50_ms'], '{:.0f}')} ms, "
                 f"p99 {num(report['latency_provisional_p99_ms'], '{:.0f}')} ms; produce -> final p50 "
                 f"{num(report['latency_final_p50_ms'], '{:.0f}')} ms, p99 {num(report['latency_final_p99_ms'], '{:.0f}')} ms")
    return lines
