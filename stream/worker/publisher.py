"""Publishing a batch's records: in order, acks awaited together, refused records handled.

`send(topic, key, value)` is async: it queues the record and returns an awaitable that resolves
when the broker acknowledged it (the faust adapter's topic.send; tests pass their own).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

from stream.core.conversation import Outcome
from stream.core.events import encode_record, has_bytes, without_bytes
from stream.settings import Settings
from stream.worker.failures import RecordRejected, cause, is_record_error
from stream.worker.metrics import Metrics

log = logging.getLogger("emotion_monitor.worker")


class Publisher:
    def __init__(self, settings: Settings, send, metrics: Metrics):
        self.s, self.send, self.metrics = settings, send, metrics

    def records(self, outcome: Outcome, dlq: list[dict[str, Any]]) -> list[tuple[str, bytes | None, dict[str, Any]]]:
        """(topic, key, value) of every record, in publishing order."""
        s = self.s
        records = [(s.emotions_topic, ev["conversation_id"].encode(), ev) for ev in outcome.events]
        records += [(s.alerts_topic, a["conversation_id"].encode(), a) for a in outcome.alerts]
        records += [(s.summaries_topic, m["conversation_id"].encode(), m) for m in outcome.summaries]
        return records + [(s.dlq_topic, None, rec) for rec in dlq]

    async def publish(self, outcome: Outcome, dlq: list[dict[str, Any]]) -> None:
        """Queue every record in order (per-key order on the topics = order of the events), then
        wait for all the broker's acks together."""
        records = self.records(outcome, dlq)
        acks = []
        for topic, key, value in records:
            try:
                acks.append(await self.send(topic, key, encode_record(value)))
            except Exception as exc:  # noqa: BLE001 - classified in _refused
                acks.append(await self._refused(topic, key, value, exc))
        sent = [(rec, a) for rec, a in zip(records, acks) if a is not None]
        results = await asyncio.gather(*[a for _, a in sent], return_exceptions=True)
        for (topic, key, value), res in zip([rec for rec, _ in sent], results):
            if isinstance(res, BaseException):
                ack = await self._refused(topic, key, value, res)
                if ack is not None:
                    await ack
        self._count_published(outcome, dlq)

    def _count_published(self, outcome: Outcome, dlq: list[dict[str, Any]]) -> None:
        for a in outcome.alerts:
            self.metrics.alerts.labels(a["severity"], a["kind"]).inc()
        for m in outcome.summaries:
            self.metrics.summaries.labels(m["ended_by"]).inc()
        # Two or more events per utterance: one labelled-counter increment per status and batch.
        for status, n in Counter(ev["status"] for ev in outcome.events).items():
            self.metrics.events_out.labels(status).inc(n)
        for rec in dlq:
            self.metrics.dlq.labels(rec["error"]).inc()
            # The error code only: the bytes, and reasons built from them, may hold producer text.
            log.warning("dead-lettered a message from partition %s offset %s: %s", rec["partition"], rec["offset"], rec["error"])

    async def _refused(self, topic: str, key, value: dict[str, Any], exc: BaseException):
        """A record the producer or the broker refused. Transient trouble and bugs propagate (the
        batch is retried, or isolated). A record refused for itself (too large, invalid) is never
        retried as it is: a dead letter goes out again without the original bytes (its size and
        hash stay); anything else is a `RecordRejected`, which isolates the message that caused it.
        Returns the ack future of the replacement, or None when nothing more can be sent."""
        if not is_record_error(exc):
            raise exc
        why = type(cause(exc)).__name__
        if topic != self.s.dlq_topic:
            raise RecordRejected(f"the broker or producer refused a {topic} record ({why})") from exc
        if not has_bytes(value):
            log.error("a dead letter from partition %s offset %s was refused even without its bytes (%s); skipped",
                      value.get("partition"), value.get("offset"), why)
            self.metrics.dlq.labels("dlq_publish_failed").inc()
            return None
        log.warning("a dead letter from partition %s offset %s was refused (%s); sending it without the original bytes",
                    value.get("partition"), value.get("offset"), why)
        slim = without_bytes(value)
        try:
            return await self.send(topic, None, encode_record(slim))
        except Exception as again:  # noqa: BLE001
            return await self._refused(topic, None, slim, again)
