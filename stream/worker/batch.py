"""The worker's batch processor: Kafka-free, Redis-thin; the faust adapter (stream.worker.app) feeds it.

Per micro-batch (README, "How it works"):
  1. decode and validate every message (bad ones -> DLQ with the original bytes and the reason);
  2. read the batch's conversations from Redis (one MGET);
  3. encode the new utterances (one encoder call) and step every conversation
     (`stream.core.conversation.advance_conversations`);
  4. publish the events and DLQ records and wait for the broker's acks;
  5. write the states back (one fenced Lua script, compare-and-set per conversation) -- only after
     the events are acked, so a crash in between leads to a redelivery that re-emits the same
     event ids, never to a lost event.
The idle timer flushes conversations of this worker's partitions that went quiet (their utterances
awaiting a final get it; they stay open) and ends those quiet for the abandonment timeout. Quiet
is measured in event time per partition (`stream.core.conversation.PartitionClock`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from stream.core.conversation import ConversationConfig, ConversationState, Outcome, PartitionClock, advance_conversations, on_idle
from stream.core.events import dead_letter
from stream.core.rules import check_labels, load_rules
from stream.core.validate import Rejected, UtteranceMessage, parse_message
from stream.settings import Settings
from stream.worker.failures import cause, is_transient, short_text
from stream.worker.metrics import Metrics
from stream.worker.publisher import Publisher
from stream.worker.state_store import StateStore, StateWriteRefused

log = logging.getLogger("emotion_monitor.worker")


class BatchProcessor:
    """Kafka-free, Redis-thin core of the agent.

    `publish(topic, key, value)` is async: it queues the record and returns an awaitable that
    resolves when the broker acknowledged it (stream.worker.publisher).
    """

    def __init__(self, settings: Settings, scorer, store: StateStore, publish):
        self.s = settings
        self.scorer = scorer
        self.store = store
        rules = load_rules(settings.rules_path, scorer.labels)
        check_labels(rules, scorer.labels)  # MELD rules with an EmoryNLP model fail here, at start-up
        check_model_settings(settings, scorer)
        self.cfg = ConversationConfig(scorer.labels, scorer.model_id, scorer.window, settings.echo_text, rules,
                                      settings.gap_wait)
        self.lock = asyncio.Lock()  # the agent and the idle timer never interleave on a conversation
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.metrics = Metrics()
        self.publisher = Publisher(settings, publish, self.metrics)
        self.vector_dim = scorer.encode([]).shape[1]  # the utterance vector's size
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
                await self._retrying(self.publisher.publish, Outcome(), [self._dead_letter(why, messages[0][:4], time.time())])
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
                name = type(cause(exc)).__name__
                self.metrics.retries.labels(name).inc()
                log.warning("transient %s (%s); retrying in %.1f s", name, short_text(cause(exc)), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _process(self, messages) -> None:
        stage = self.metrics.stage
        now = t0 = time.time()
        inputs: list = []
        origin: list[tuple[bytes | None, bytes | None, int, int]] = []
        dlq: list[dict[str, Any]] = []
        event_ts: list[float] = []
        for m in messages:
            key, value, partition, offset = m[:4]
            parsed = parse_message(value, key, self.s.max_message_bytes, self.s.max_text_chars)
            if isinstance(parsed, Rejected):
                dlq.append(self._dead_letter(parsed, m[:4], now))
            else:
                inputs.append(parsed)
                origin.append((key, value, partition, offset))
                event_ts.append(_event_ts(m, now))
        self.metrics.utterances_in.inc(len(messages))
        self.metrics.batch_size.observe(len(messages))
        partitions = {item.conversation_id: origin[i][2] for i, item in enumerate(inputs)}
        outcome = Outcome()
        new_convs: dict[str, ConversationState] = {}
        t1 = time.time()
        stage.labels("decode").observe(t1 - t0)
        if inputs:
            convs = await self.store.load(partitions)
            t2 = time.time()
            stage.labels("redis_read").observe(t2 - t1)
            loop = asyncio.get_running_loop()
            new_convs, outcome = await loop.run_in_executor(self.executor, self._compute, convs, inputs, now, event_ts)
            dlq += [self._dead_letter(why, origin[i], now) for i, why in outcome.rejected]
            self.metrics.duplicates.inc(len(outcome.duplicates))
            self._count_outcome(outcome)
        t3 = time.time()
        await self.publisher.publish(outcome, dlq)
        t4 = time.time()
        stage.labels("produce").observe(t4 - t3)
        await self._save(new_convs, partitions)
        stage.labels("redis_write").observe(time.time() - t4)

    def _compute(self, convs, inputs, now, event_ts=None):
        t0 = time.time()
        idx = [i for i, x in enumerate(inputs) if isinstance(x, UtteranceMessage)]
        vectors = np.zeros((len(inputs), self.vector_dim), dtype=np.float32)
        if idx:
            vectors[idx] = self.scorer.encode([inputs[i].text for i in idx])
        t1 = time.time()
        result = advance_conversations(self.cfg, self.scorer.step, convs, inputs, vectors, now, event_ts)
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

    def _count_outcome(self, outcome: Outcome) -> None:
        if outcome.gaps_filled:
            self.metrics.seq_gaps.labels("filled").inc(outcome.gaps_filled)
        if outcome.gaps_skipped:
            self.metrics.seq_gaps.labels("skipped").inc(outcome.gaps_skipped)
        if outcome.model_changes:
            self.metrics.model_changes.inc(outcome.model_changes)
            log.warning("%d conversation(s) were written by another model; their utterances awaiting a final got it under "
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
        await self.publisher.publish(outcome, [])
        fenced = await self._save(changed, {c: partition for c in changed}, (partition, self.worker_id))
        self._count_outcome(outcome)
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
            outcome.extend(out)
        return changed, outcome

    async def assigned(self, partitions: set[int]) -> None:
        """Kafka assigned these partitions to this worker: claim them (a stalled former owner's
        timer then leaves them alone) and start their clocks afresh."""
        async with self.lock:
            await self._retrying(self.store.claim, sorted(partitions), self.worker_id)
            for p in partitions:
                self.clocks.pop(p, None)

    async def _save(self, convs: dict[str, ConversationState], partitions: dict[str, int],
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
                log.warning("transient %s while saving state (%s); retrying in %.1f s", type(exc).__name__, short_text(exc), delay)
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

    def _dead_letter(self, why: Rejected, origin: tuple, now: float) -> dict[str, Any]:
        """The dead letter of the message at `origin` = (key, value, partition, offset)."""
        key, value, partition, offset = origin
        return dead_letter(why.error, why.reason, self.s.utterances_topic, partition, offset, key, value, now,
                           self.s.dlq_max_bytes)


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
