"""The worker: faust agent over `utterances` -> `emotions` (+ `utterances-dlq`), state in Redis.

Per micro-batch (README, "How it works"):
  1. decode and validate every message (bad ones -> DLQ with the original bytes and the reason);
  2. read the batch's conversations from Redis (one MGET);
  3. encode the new utterances (one encoder call) and step every conversation (`stream.logic.step`);
  4. publish the events and DLQ records and wait for the broker's acks;
  5. write the states back (one fenced Lua script, compare-and-set per conversation) -- only after
     the events are acked, so a crash in between leads to a redelivery that re-emits the same
     event ids, never to a lost event.
The idle timer flushes conversations of this worker's partitions that went quiet (their pending
utterances become final; they stay open) and ends those quiet for the abandonment timeout. Quiet
is measured in event time per partition (`stream.logic.PartitionClock`).
"""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import os
import socket
import uuid
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from stream.alerts import check_labels, load_rules
from stream.logic import Conversation, Outcome, PartitionClock, StepConfig, on_idle, step
from stream.metrics import Metrics
from stream.settings import Settings
from stream.state_store import StateStore, StateWriteRefused
from stream.validate import End, Rejected, Utterance, parse_message

log = logging.getLogger("emotion_monitor.worker")


class BatchProcessor:
    """Kafka-free, Redis-thin core of the agent.

    `publish(topic, key, value)` is async: it queues the record and returns an awaitable that
    resolves when the broker acknowledged it.
    """

    def __init__(self, settings: Settings, scorer, store: StateStore, publish):
        self.s = settings
        self.scorer = scorer
        self.store = store
        self.publish = publish
        rules = load_rules(settings.rules_path, scorer.labels)
        check_labels(rules, scorer.labels)  # MELD rules with an EmoryNLP model fail here, at start-up
        check_model_settings(settings, scorer)
        self.cfg = StepConfig(scorer.labels, scorer.model_id, scorer.window, settings.echo_text, rules, settings.gap_wait)
        self.lock = asyncio.Lock()  # the agent and the idle timer never interleave on a conversation
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.metrics = Metrics()
        self.metrics.model_info.labels(*scorer.model_id.partition("@")[::2], str(scorer.device)).set(1)
        # Event-time progress per input partition, and the wall time spent holding the lock
        # (processing): see PartitionClock.
        self.clocks: dict[int, PartitionClock] = {}
        self.busy_s = 0.0
        # Set while Redis answers but refuses the state write (OOM, READONLY, ...): /readyz says 503.
        self.redis_refusing: str | None = None
        # Whether this worker still owns an input partition (set by the faust adapter): the idle
        # timer re-checks it per partition, under the lock, right before it flushes anything.
        self.owns = lambda partition: True
        # This process in the partitions' owner records (StateStore.claim): fences a stalled
        # worker's idle timer off partitions that another worker was assigned meanwhile.
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        store.on_quarantine = lambda reason: self.metrics.quarantined.labels(reason).inc()

    def _read(self, messages, wall: float) -> None:
        """Advance the partitions' clocks with the message timestamps of a batch just read."""
        for m in messages:
            partition, ts = m[2], _event_ts(m, wall)
            clock = self.clocks.get(partition)
            self.clocks[partition] = (clock or PartitionClock(ts, wall, self.busy_s)).advance(ts, wall, self.busy_s)

    def owned(self, partitions: set[int]) -> None:
        """Forget the clocks of partitions this worker no longer owns (a rebalance)."""
        for p in [p for p in self.clocks if p not in partitions]:
            del self.clocks[p]

    async def process(self, messages: list[tuple]) -> None:
        """messages: (key, value, partition, offset[, timestamp]) in consumption order; timestamp
        is the Kafka message timestamp in unix seconds (default: now).

        Redis or broker trouble (a restart, a network blip) is retried with backoff until it
        passes: a batch is never dropped. Retrying is safe because the whole batch is idempotent
        (state is written last, event ids are deterministic, redeliveries are recognised).
        """
        self._read(messages, time.time())
        async with self.lock:
            t0 = time.monotonic()
            try:
                await self._isolating(messages)
            finally:
                self.busy_s += time.monotonic() - t0

    async def _isolating(self, messages) -> None:
        """A failure that is not transient (a bug, a message that trips one) must not stop the
        worker or hold up the others: the batch is retried one message at a time, and a message
        that fails alone goes to the DLQ with the error's type (never silently dropped)."""
        try:
            await self._retrying(self._process, messages)
        except Exception as exc:  # noqa: BLE001 - anything not transient
            if len(messages) > 1:
                log.error("batch of %d failed (%s); retrying one message at a time", len(messages), type(exc).__name__)
                for m in messages:
                    await self._isolating([m])
                return
            key, value, partition, offset = messages[0][:4]
            # The type only at error level: an exception's text could quote the message's content.
            log.error("message at partition %s offset %s failed (%s); dead-lettered", partition, offset, type(exc).__name__)
            log.debug("traceback of the dead-lettered failure", exc_info=True)
            why = Rejected("internal_error", f"processing failed with {type(exc).__name__}; the message is kept for inspection")
            try:
                await self._retrying(self._publish, Outcome(), [self._dlq_record(why, key, value, partition, offset, time.time())])
            except Exception as again:  # noqa: BLE001 - the last resort must not stop the batch
                log.error("message at partition %s offset %s could not be dead-lettered either (%s); skipped so the "
                          "rest of its batch goes on", partition, offset, type(again).__name__)
                self.metrics.dlq.labels("dlq_publish_failed").inc()

    async def _retrying(self, fn, *args):
        delay = 0.1
        while True:
            try:
                return await fn(*args)
            except Exception as exc:  # noqa: BLE001 - classified below
                if not is_transient(exc):
                    raise
                name = type(_cause(exc)).__name__
                self.metrics.retries.labels(name).inc()
                log.warning("transient %s (%s); retrying in %.1f s", name, _short(_cause(exc)), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _process(self, messages) -> None:
        stage = self.metrics.stage
        now = t0 = time.time()
        inputs: list[Utterance | End] = []
        origin: list[tuple[bytes | None, bytes | None, int, int]] = []
        dlq: list[dict[str, Any]] = []
        event_ts: list[float] = []
        for m in messages:
            key, value, partition, offset = m[:4]
            parsed = parse_message(value, key, self.s.max_message_bytes, self.s.max_text_chars)
            if isinstance(parsed, Rejected):
                dlq.append(self._dlq_record(parsed, key, value, partition, offset, now))
            else:
                inputs.append(parsed)
                origin.append((key, value, partition, offset))
                event_ts.append(_event_ts(m, now))
        self.metrics.utterances_in.inc(len(messages))
        self.metrics.batch_size.observe(len(messages))
        partitions = {item.conversation_id: origin[i][2] for i, item in enumerate(inputs)}
        outcome = Outcome()
        new_convs: dict[str, Conversation] = {}
        t1 = time.time()
        stage.labels("decode").observe(t1 - t0)
        if inputs:
            convs = await self.store.load(partitions)
            t2 = time.time()
            stage.labels("redis_read").observe(t2 - t1)
            loop = asyncio.get_running_loop()
            new_convs, outcome = await loop.run_in_executor(self.executor, self._compute, convs, inputs, now, event_ts)
            for i, why in outcome.rejected:
                key, value, partition, offset = origin[i]
                dlq.append(self._dlq_record(why, key, value, partition, offset, now))
            self.metrics.duplicates.inc(len(outcome.duplicates))
            self._count(outcome)
        t3 = time.time()
        await self._publish(outcome, dlq)
        t4 = time.time()
        stage.labels("produce").observe(t4 - t3)
        await self._save(new_convs, partitions)
        stage.labels("redis_write").observe(time.time() - t4)

    def _compute(self, convs, inputs, now, event_ts=None):
        t0 = time.time()
        texts = [x.text if isinstance(x, Utterance) else "" for x in inputs]
        idx = [i for i, x in enumerate(inputs) if isinstance(x, Utterance)]
        vectors = np.zeros((len(inputs), self.scorer.model.encoder.dim), dtype=np.float32)
        if idx:
            vectors[idx] = self.scorer.encode([texts[i] for i in idx])
        t1 = time.time()
        result = step(self.cfg, self.scorer.step, convs, inputs, vectors, now, event_ts)
        self.metrics.stage.labels("encode").observe(t1 - t0)
        self.metrics.stage.labels("step").observe(time.time() - t1)
        return result

    async def finalize_idle(self, partition: int) -> int:
        """Flush conversations of `partition` quiet for idle_finalize_s and end those quiet for
        abandon_after_s, both in the partition's event time. Returns how many changed."""
        async with self.lock:
            t0 = time.monotonic()
            try:
                return await self._retrying(self._finalize_idle, partition)
            finally:
                self.busy_s += time.monotonic() - t0

    def _count(self, outcome: Outcome) -> None:
        if outcome.gaps_filled:
            self.metrics.seq_gaps.labels("filled").inc(outcome.gaps_filled)
        if outcome.gaps_skipped:
            self.metrics.seq_gaps.labels("skipped").inc(outcome.gaps_skipped)
        if outcome.model_changes:
            self.metrics.model_changes.inc(outcome.model_changes)
            log.warning("%d conversation(s) were written by another model; their pending utterances got finals under "
                        "that model's id and their context started over (context_reset)", outcome.model_changes)

    async def _finalize_idle(self, partition: int) -> int:
        owner = await self.store.owner(partition)
        if not self.owns(partition) or owner not in (None, self.worker_id):
            # Lost in a rebalance since the timer listed it (or this worker stalled and another
            # one was assigned the partition meanwhile): the new owner flushes it.
            self.clocks.pop(partition, None)
            return 0
        now = time.time()
        clock = self.clocks.get(partition)
        if clock is None:
            # Nothing read from this partition yet (just started, or just assigned): start from
            # the newest utterance its previous owner stored, and advance from now.
            newest = await self.store.newest_open(partition)
            if newest is None:
                return 0  # no open conversation in this partition
            clock = self.clocks[partition] = PartitionClock(newest, now, self.busy_s)
        event_now = clock.now(now, self.busy_s)
        flush = await self.store.idle_since(partition, event_now - self.s.idle_finalize_s)
        abandon = await self.store.open_since(partition, event_now - self.s.abandon_after_s)
        gaps = await self.store.gap_since(partition, event_now - self.cfg.gap_wait_s)
        cids = list(dict.fromkeys(abandon + flush + gaps))
        if not cids:
            return 0
        convs = await self.store.load(cids)
        # An entry left in this partition's sets by a conversation now saved from another one
        # (partitions added, keys moved) is stale: it never flushes the live conversation.
        stale = [c for c in cids if convs.get(c) is not None and convs[c].partition not in (None, partition)]
        gone = [c for c in cids if convs.get(c) is None or convs[c].ended]
        convs = {c: v for c, v in convs.items() if c not in stale}
        changed, outcome = await self._on_idle(partition, convs, set(abandon), set(flush), now, event_now)
        if not self.owns(partition):  # lost while computing: publish and write nothing
            return 0
        await self._publish(outcome, [])
        fenced = await self._save(changed, {c: partition for c in changed}, (partition, self.worker_id))
        self._count(outcome)
        await self.store.forget_idle(partition, stale + gone)
        flushed = sum(1 for c, v in changed.items() if not v.ended and c not in fenced)
        self.metrics.idle_finalized.inc(flushed)
        if changed:
            log.info("partition %s: %d conversation(s) flushed after a pause, %d abandoned", partition, flushed,
                     sum(1 for v in changed.values() if v.ended))
        return len(changed)

    async def _on_idle(self, partition, convs, abandoned, flush, now, event_now):
        """`on_idle` for the conversations of one timer run, isolated per conversation: one whose
        state cannot be processed (a bug, a state the model cannot take) is quarantined with the
        error's type as the reason, and the others go on; the timer never crashes the app."""
        loop = asyncio.get_running_loop()

        def run(subset):
            return on_idle(self.cfg, subset, abandoned & set(subset), now, self.scorer.step, event_now, flush & set(subset))

        try:
            return await loop.run_in_executor(self.executor, run, convs)
        except Exception:  # noqa: BLE001 - find the conversation(s) that cause it
            if len(convs) == 1:
                raise
        changed, outcome = {}, Outcome()
        for cid, conv in convs.items():
            try:
                ch, out = await loop.run_in_executor(self.executor, run, {cid: conv})
            except Exception as exc:  # noqa: BLE001
                log.debug("traceback of the quarantined conversation", exc_info=True)
                await self.store.quarantine(cid, f"idle_timer_failed:{type(exc).__name__}")
                await self.store.forget_idle(partition, [cid])
                continue
            changed.update(ch)
            for name in ("events", "alerts", "summaries"):
                getattr(outcome, name).extend(getattr(out, name))
            outcome.gaps_skipped += out.gaps_skipped
            outcome.model_changes += out.model_changes
        return changed, outcome

    async def assigned(self, partitions: set[int]) -> None:
        """Kafka assigned these partitions to this worker: claim them (a stalled former owner's
        timer then leaves them alone) and start their clocks afresh."""
        async with self.lock:
            await self._retrying(self.store.claim, sorted(partitions), self.worker_id)
            for p in partitions:
                self.clocks.pop(p, None)

    async def _save(self, convs: dict[str, Conversation], partitions: dict[str, int],
                    owner: tuple[int, str] | None = None) -> set[str]:
        """Write the batch's states, retrying with backoff until Redis takes them.

        The events are already published (and acked) at this point: retrying the write alone
        publishes nothing twice, and no valid message is dead-lettered because Redis refuses
        writes (OOM under maxmemory + noeviction, READONLY after a failover, EXECABORT, ...)
        or is briefly unreachable. The batch's offsets are not committed meanwhile (the agent
        waits here), so a crash in between redelivers the batch: same event ids again.

        Returns the conversations whose write was fenced off: another worker wrote them since
        they were read (this one lost their partition); its newer state stays."""
        delay, since, last_log = 0.1, None, 0.0
        while True:
            try:
                fenced = await self.store.save(convs, partitions, owner)
                break
            except StateWriteRefused as exc:
                now = time.monotonic()
                since = since or now
                self.redis_refusing = exc.code
                self.metrics.retries.labels(f"redis_{exc.code.lower()}").inc()
                self.metrics.redis_writable.set(0)
                if now - last_log >= 30.0 or last_log == 0.0:
                    # The code and what it means only: the client's text quotes the state.
                    log.error("%s; the state of %d conversation(s) is not saved, retrying every <= 5 s (refused for "
                              "%.0f s; /readyz says 503; events of the batch are already published, nothing is "
                              "dead-lettered)", exc, len(convs), now - since)
                    last_log = now
            except Exception as exc:  # noqa: BLE001 - classified
                if not is_transient(exc):
                    raise
                self.metrics.retries.labels(type(exc).__name__).inc()
                log.warning("transient %s while saving state (%s); retrying in %.1f s", type(exc).__name__, _short(exc), delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        if self.redis_refusing is not None:
            log.warning("Redis accepts writes again (was refusing: %s); state saved", self.redis_refusing)
            self.redis_refusing = None
            self.metrics.redis_writable.set(1)
        if fenced:
            self.metrics.fenced.inc(len(fenced))
            log.warning("%d conversation state write(s) refused: another worker wrote them since they were read (this "
                        "worker lost their partition in a rebalance); the newer state stays", len(fenced))
        return fenced

    async def _publish(self, outcome: Outcome, dlq: list[dict[str, Any]]) -> None:
        """Queue every record in order (per-key order on the topics = order of the events), then
        wait for all the broker's acks together."""
        s = self.s
        records = [(s.emotions_topic, ev["conversation_id"].encode(), ev) for ev in outcome.events]
        records += [(s.alerts_topic, a["conversation_id"].encode(), a) for a in outcome.alerts]
        records += [(s.summaries_topic, m["conversation_id"].encode(), m) for m in outcome.summaries]
        records += [(s.dlq_topic, None, rec) for rec in dlq]
        acks = []
        for topic, key, value in records:
            try:
                acks.append(await self.publish(topic, key, _dumps(value)))
            except Exception as exc:  # noqa: BLE001 - classified in _rejected_record
                acks.append(await self._rejected_record(topic, key, value, exc))
        results = await asyncio.gather(*[a for a in acks if a is not None], return_exceptions=True)
        retry = []
        pending = [(rec, a) for rec, a in zip(records, acks) if a is not None]
        for (rec, _), res in zip(pending, results):
            if isinstance(res, BaseException):
                retry.append((rec, res))
        for (topic, key, value), exc in retry:
            ack = await self._rejected_record(topic, key, value, exc)
            if ack is not None:
                await ack
        for a in outcome.alerts:
            self.metrics.alerts.labels(a["severity"], a["kind"]).inc()
        for m in outcome.summaries:
            self.metrics.summaries.labels(m["ended_by"]).inc()
        for ev in outcome.events:
            self.metrics.events_out.labels(ev["status"]).inc()
        for rec in dlq:
            self.metrics.dlq.labels(rec["error"]).inc()
            # The error code only: the bytes, and reasons built from them, may hold producer text.
            log.warning("dead-lettered a message from partition %s offset %s: %s", rec["partition"], rec["offset"], rec["error"])

    async def _rejected_record(self, topic: str, key, value: dict[str, Any], exc: BaseException):
        """A record the producer or the broker refused. Transient trouble and bugs propagate (the
        batch is retried, or isolated). A record refused for itself (too large, invalid) is never
        retried as it is: a dead letter goes out again without the original bytes (its size and
        hash stay); anything else is a `RecordRejected`, which isolates the message that caused it.
        Returns the ack future of the replacement, or None when nothing more can be sent."""
        if not is_record_error(exc):
            raise exc
        if topic != self.s.dlq_topic:
            raise RecordRejected(f"the broker or producer refused a {topic} record ({type(_cause(exc)).__name__})") from exc
        if value.get("value_b64") == "" and not value.get("key_b64"):
            log.error("a dead letter from partition %s offset %s was refused even without its bytes (%s); skipped",
                      value.get("partition"), value.get("offset"), type(_cause(exc)).__name__)
            self.metrics.dlq.labels("dlq_publish_failed").inc()
            return None
        log.warning("a dead letter from partition %s offset %s was refused (%s); sending it without the original bytes",
                    value.get("partition"), value.get("offset"), type(_cause(exc)).__name__)
        slim = {**value, "key_b64": None, "key_truncated": value.get("key_b64") is not None or value.get("key_truncated", False),
                "value_b64": "", "value_truncated": True,
                "reason": value["reason"] + " (the dead letter was too large for the broker: bytes left out)"}
        try:
            return await self.publish(topic, None, _dumps(slim))
        except Exception as again:  # noqa: BLE001
            return await self._rejected_record(topic, None, slim, again)

    def _dlq_record(self, why: Rejected, key, value, partition, offset, now) -> dict[str, Any]:
        """The dead letter: the original bytes up to `dlq_max_bytes` (a prefix beyond that: a
        1 MB message must not make a record the producer or broker refuses), with the original
        size and SHA-256 so the message can still be identified."""
        cap = self.s.dlq_max_bytes
        raw = value or b""
        return {
            "reason": why.reason,
            "error": why.error,
            "topic": self.s.utterances_topic,
            "partition": partition,
            "offset": offset,
            "key_b64": base64.b64encode(key[:cap]).decode() if key is not None else None,
            "key_truncated": key is not None and len(key) > cap,
            "value_b64": base64.b64encode(raw[:cap]).decode(),
            "value_truncated": len(raw) > cap,
            "value_size": len(raw),
            "value_sha256": hashlib.sha256(raw).hexdigest(),
            "ts_received": now,
        }


def check_model_settings(settings: Settings, scorer) -> None:
    """What the settings need from the model, checked at start-up (the settings checked among
    themselves in stream/settings.py)."""
    if scorer.lookahead >= scorer.window:
        raise ValueError(f"model {scorer.model_id}: lookahead {scorer.lookahead} must be smaller than its window "
                         f"{scorer.window}; retrain it with a larger window")
    if not settings.idle_finalize_s > 0 or not settings.abandon_after_s > 0:  # pragma: no cover - the fields forbid it
        raise ValueError("EMOTION_MONITOR_IDLE_FINALIZE_S and EMOTION_MONITOR_ABANDON_AFTER_S must be positive")


def _event_ts(message: tuple, default: float) -> float:
    """The Kafka message timestamp (unix seconds) of a (key, value, partition, offset[, ts]) tuple."""
    ts = message[4] if len(message) > 4 else None
    return float(ts) if ts is not None and ts > 0 else default


class RecordRejected(Exception):
    """An output record (event, alert, summary) that the producer or broker refused for itself."""


def _transient_errors() -> tuple[type[BaseException], ...]:
    import redis.exceptions
    from aiokafka.errors import KafkaError

    return (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError,
            KafkaError, ConnectionError, asyncio.TimeoutError)


def _record_errors() -> tuple[type[BaseException], ...]:
    from aiokafka import errors as k

    return (k.MessageSizeTooLargeError, k.RecordTooLargeError, k.RecordListTooLargeError, k.InvalidMessageError,
            k.CorruptRecordException, k.UnsupportedForMessageFormatError, k.InvalidTimestampError)


TRANSIENT = _transient_errors()
RECORD_ERRORS = _record_errors()


def _cause(exc: BaseException) -> BaseException:
    """faust wraps the Kafka client's errors (`ProducerSendError(...) from exc`): the cause decides."""
    from faust.exceptions import ProducerSendError

    while isinstance(exc, ProducerSendError) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def is_record_error(exc: BaseException) -> bool:
    """The record itself was refused (too large, invalid): retrying it as it is cannot help."""
    return isinstance(_cause(exc), RECORD_ERRORS)


def is_transient(exc: BaseException) -> bool:
    """Worth retrying the same work: Redis or broker connection trouble, leader moves, timeouts
    (any Kafka client error except a refused record, wrapped by faust or not)."""
    cause = _cause(exc)
    return isinstance(cause, TRANSIENT) and not isinstance(cause, RECORD_ERRORS)


def _short(exc: BaseException) -> str:
    # Exception texts from clients may echo a URL with a password: keep only the first line, masked.
    import re

    return re.sub(r"//[^@/\s]*@", "//***@", str(exc).splitlines()[0] if str(exc) else "")[:200]


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def build_app(settings: Settings, scorer):
    """The faust app with its agent and idle timer (the thin Kafka adapter)."""
    import redis.asyncio as aioredis

    from stream.faust_app import make_app

    app = make_app(settings)
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    # Keys are namespaced by app id: two deployments (say a MELD and an EmoryNLP model) can share
    # one Redis without one's idle timer finalising the other's conversations.
    client = aioredis.from_url(settings.redis_url, password=password, socket_connect_timeout=5, socket_timeout=10)
    store = StateStore(client, settings.state_ttl_s, prefix=f"em:{settings.app_id}")  # Redis Cluster: not supported
    source = app.topic(settings.utterances_topic, partitions=settings.partitions)
    outputs = (settings.emotions_topic, settings.alerts_topic, settings.summaries_topic, settings.dlq_topic)
    topics = {name: app.topic(name, partitions=settings.partitions) for name in outputs}

    async def publish(topic: str, key: bytes | None, value: bytes):
        # Returns the ack future: awaiting send() itself only queues, in call order.
        return await topics[topic].send(key=key, value=value)

    processor = BatchProcessor(settings, scorer, store, publish)
    app.processor = processor  # for tests and metrics

    @app.agent(source, concurrency=1)
    async def monitor(stream):
        async for batch in stream.take_events(settings.max_batch, within=settings.max_wait_ms / 1000.0):
            msgs = [(e.message.key, e.message.value, e.message.partition, e.message.offset, e.message.timestamp)
                    for e in batch]
            try:
                await processor.process(msgs)
            except Exception:
                # Redis or broker trouble: log without payloads and let faust crash the agent,
                # so the batch is redelivered (offsets are not committed past it).
                log.exception("batch of %d messages failed", len(msgs))
                raise

    def assigned_now() -> set[int]:
        return {tp.partition for tp in app.consumer.assignment() if tp.topic == settings.utterances_topic}

    processor.owns = lambda p: p in assigned_now()

    @app.on_partitions_assigned.connect
    async def on_assigned(sender, assigned, **kwargs) -> None:
        mine = {tp.partition for tp in assigned if tp.topic == settings.utterances_topic}
        try:
            await processor.assigned(mine)
        except Exception as exc:  # noqa: BLE001 - never fail the rebalance; the timer re-checks
            log.error("could not record the ownership of partitions %s (%s)", sorted(mine), type(exc).__name__)

    # Also the gap wait's timer (at least every gap_wait / 2), whatever the lookahead: with
    # lookahead 0 nothing is pending, but conversations are still abandoned with their summary.
    @app.timer(interval=max(0.25, min(settings.idle_finalize_s / 4, settings.gap_wait / 2 or 0.25)))
    async def finalize_idle() -> None:
        assigned = assigned_now()
        processor.owned(assigned)
        for p in sorted(assigned):
            try:
                await processor.finalize_idle(p)
            except Exception as exc:  # noqa: BLE001 - the timer must never crash the app
                log.error("idle timer on partition %s failed (%s); retried at its next run", p, type(exc).__name__)
                log.debug("traceback of the idle timer failure", exc_info=True)

    @app.page("/metrics")
    async def metrics(web, request):
        # Prometheus' text format; aiohttp refuses a charset inside content_type (UTF-8 is the default).
        return web.bytes(processor.metrics.render(), content_type="text/plain; version=0.0.4")

    @app.page("/healthz")
    async def healthz(web, request):
        # Liveness: the event loop answers (a wedged loop would not).
        return web.json({"status": "ok"})

    @app.page("/readyz")
    async def readyz(web, request):
        # Readiness: the model is loaded (it is, before faust starts), Redis answers, and this
        # worker holds partitions of the utterances topic.
        assigned = [tp.partition for tp in app.consumer.assignment() if tp.topic == settings.utterances_topic]
        refused = None
        try:
            redis_ok = bool(await store.r.ping())
            # Redis may answer and still refuse writes (OOM with noeviction, a read-only replica).
            refused = processor.redis_refusing or await store.probe_write()
        except Exception:  # noqa: BLE001 - any Redis failure means not ready
            redis_ok = False
        ready = redis_ok and refused is None and bool(assigned)
        return web.json({"ready": ready, "redis": redis_ok, "redis_writes": "ok" if refused is None else f"refused ({refused})",
                         "partitions": sorted(assigned), "model": scorer.model_id},
                        status=200 if ready else 503)

    @app.timer(interval=30.0)
    async def report() -> None:
        totals = processor.metrics.totals()
        if totals:
            log.info("counts: %s", totals)

    return app


def run_worker(settings: Settings) -> None:
    """Load the model, make sure the topics exist, then hand over to faust's worker."""
    import faust

    from model.scorer import Scorer
    from stream.kafka import create_topics, monitor_topics

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    scorer = Scorer(settings.model_path, settings.device, settings.backend, settings.max_batch, settings.max_batch_tokens)
    log.info("model %s on %s, encoder backend %s (lookahead %d, window %d)", scorer.model_id, scorer.device,
             scorer.backend, scorer.lookahead, scorer.window)
    asyncio.run(create_topics(settings.brokers, monitor_topics(settings), settings))
    app = build_app(settings, scorer)
    # torch, transformers and faust leave ~440k long-lived objects to the cyclic garbage
    # collector; a full collection walked them all and stalled the worker for 280-330 ms (measured
    # under load), right in the latency tail. Frozen after start-up, they are skipped: a full
    # collection under load then took 4 ms.
    gc.collect()
    gc.freeze()
    worker = faust.Worker(app, loglevel=settings.log_level, quiet=True)
    worker.execute_from_commandline()
