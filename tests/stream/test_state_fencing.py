"""Issue 13, items 5 and 9 at the state store, against a real redis-server: fenced writes, stale
timer entries, quarantined states; and the idle timer's per-conversation isolation."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis.asyncio as aioredis

from stream.core.conversation import ConversationState, PartitionClock, UttMeta
from stream.worker.state_store import StateStore

pytestmark = pytest.mark.integration


def _store(stack) -> StateStore:
    return StateStore(aioredis.from_url(stack.redis_url), ttl_s=600, prefix=f"em:test-{uuid.uuid4().hex[:8]}")


def _open(last_seq: int, ts: float = 100.0) -> ConversationState:
    return ConversationState(last_seq=last_seq, last_event_ts=ts, awaiting_final={0: UttMeta(last_seq, "s", None, None, ts)})


def test_a_write_from_a_stale_read_is_fenced_off(stack):
    """Two workers read version 1; the one that writes second (it lost the partition meanwhile)
    must not overwrite the newer state (before: a plain SET, last writer wins)."""

    async def go():
        store = _store(stack)
        try:
            assert await store.save({"c": _open(0)}, {"c": 0}) == set()
            mine = (await store.load(["c"]))["c"]
            zombie = (await store.load(["c"]))["c"]
            assert mine.version == zombie.version == 1 and mine.partition == 0
            assert await store.save({"c": _open(5)}, {"c": 0}) == {"c"}  # never read: version 0 != 1
            assert await store.save({"c": ConversationState(**{**vars(mine), "last_seq": 7})}, {"c": 0}) == set()
            refused = await store.save({"c": ConversationState(**{**vars(zombie), "last_seq": 3, "ended": True})}, {"c": 0})
            assert refused == {"c"}
            now = (await store.load(["c"]))["c"]
            assert (now.last_seq, now.ended, now.version) == (7, False, 2)
            # the rest of a batch is still written when one of its conversations is fenced
            other = (await store.load(["d"]))["d"]
            assert other is None
            assert await store.save({"c": zombie, "d": _open(0)}, {"c": 0, "d": 0}) == {"c"}
            assert (await store.load(["d"]))["d"].last_seq == 0
        finally:
            await store.r.aclose()

    asyncio.run(go())


def test_an_undecodable_state_is_quarantined_not_fatal(stack):
    async def go():
        store = _store(stack)
        reasons = []
        store.on_quarantine = reasons.append
        try:
            await store.r.set(store._key("bad"), b"\x00not a state")
            await store.save({"ok": _open(0)}, {"ok": 0})
            got = await store.load(["bad", "ok"])
            assert got["bad"] is None and got["ok"].last_seq == 0
            assert await store.r.get(store.quarantine_key("bad")) == b"\x00not a state"
            assert await store.r.get(store._key("bad")) is None and reasons == ["state_undecodable"]
        finally:
            await store.r.aclose()

    asyncio.run(go())


# ---- the idle timer (BatchProcessor, real Redis, real tiny model, publish captured) -------------

def _processor(stack, app_id, **settings):
    import json

    import torch

    from model.modeling import EmotionSIModel
    from stream.settings import Settings
    from stream.worker.batch import BatchProcessor
    from tests.conftest import tiny_config

    from model.scorer import Scorer
    torch.manual_seed(0)
    scorer = Scorer.from_model(EmotionSIModel(tiny_config()), "tiny", "1")
    s = Settings(app_id=app_id, idle_finalize_s=2.0, abandon_after_s=60.0, **settings)
    sent: list[tuple[str, dict]] = []

    async def publish(topic, key, value):
        sent.append((topic, json.loads(value)))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    store = StateStore(aioredis.from_url(stack.redis_url), 600, prefix=f"em:{app_id}")
    return s, BatchProcessor(s, scorer, store, publish), sent


def _msgs(cid, seqs, ts, partition=0):
    import json

    return [(cid.encode(), json.dumps({"conversation_id": cid, "seq": q, "speaker": f"s{q % 2}", "text": f"words {q}"}).encode(),
             partition, q, ts) for q in seqs]


def test_one_unprocessable_conversation_does_not_stop_the_idle_timer(stack):
    """Item 9: a state the timer cannot process is quarantined with a reason; the other
    conversations of the partition are still flushed, and nothing raises out of the timer."""
    app_id = f"timer-{uuid.uuid4().hex[:6]}"
    s, proc, sent = _processor(stack, app_id)

    async def go():
        await proc.process(_msgs("good", [0, 1], 1000.0) + _msgs("poison", [0, 1], 1000.0))
        # the timer runs the model for held utterances only; make "poison" trip the flush instead
        import stream.core.conversation as conversation

        orig = conversation.flush_conversation

        def flush(cfg, cid, conv, now, out):
            if cid == "poison":
                raise ValueError("injected: a state the timer cannot process")
            return orig(cfg, cid, conv, now, out)

        conversation.flush_conversation = flush
        try:
            proc.clocks[0] = proc.clocks[0].advance(1010.0, proc.clocks[0].wall_at, proc.busy_s)  # 10 s of event time later
            changed = await proc.finalize_idle(0)
            changed_again = await proc.finalize_idle(0)  # the next run does not trip on it again
        finally:
            conversation.flush_conversation = orig
        keys = [await proc.store.r.exists(proc.store.quarantine_key(c)) for c in ("poison", "good")]
        await proc.store.r.aclose()
        return changed, changed_again, keys

    changed, changed_again, quarantined = asyncio.run(go())
    finals = sorted((e["conversation_id"], e["seq"]) for t, e in sent if t == s.emotions_topic and e["status"] == "final")
    assert finals == [("good", 0), ("good", 1)] and changed == 1 and changed_again == 0
    assert quarantined == [1, 0]
    assert proc.metrics.quarantined.labels("idle_timer_failed")._value.get() == 1


def test_a_stale_entry_in_another_partitions_timer_set_never_flushes_a_live_conversation(stack):
    """Item 5: a conversation saved from partition 1 (partitions were added) left an entry in
    partition 0's idle set; partition 0's timer must drop it, not flush the live conversation."""
    app_id = f"stale-{uuid.uuid4().hex[:6]}"
    s, proc, sent = _processor(stack, app_id)

    async def go():
        await proc.process(_msgs("moved", [0, 1], 1000.0, partition=0))  # saved from partition 0 ...
        await proc.process(_msgs("moved", [2], 1000.0, partition=1))  # ... then from partition 1
        assert await proc.store.idle_since(0, 1e12) == ["moved"]  # the old entry is still there
        proc.clocks[0] = proc.clocks[0].advance(1010.0, proc.clocks[0].wall_at, proc.busy_s)
        n = await proc.finalize_idle(0)
        left = await proc.store.idle_since(0, 1e12)
        await proc.store.r.aclose()
        return n, left

    n, left = asyncio.run(go())
    assert n == 0 and left == []
    assert not [e for t, e in sent if t == s.emotions_topic and e["status"] == "final" and e["seq"] >= 1]


def test_the_idle_timer_does_nothing_for_a_partition_it_no_longer_owns(stack):
    app_id = f"owner-{uuid.uuid4().hex[:6]}"
    s, proc, sent = _processor(stack, app_id)

    async def go():
        await proc.process(_msgs("c", [0, 1], 1000.0))
        proc.clocks[0] = proc.clocks[0].advance(1010.0, proc.clocks[0].wall_at, proc.busy_s)
        proc.owns = lambda p: False  # revoked in a rebalance after the timer listed it
        n = await proc.finalize_idle(0)
        assert 0 not in proc.clocks  # forgotten: a new owner starts from the stored newest utterance
        proc.owns = lambda p: True
        proc.clocks[0] = PartitionClock(1010.0, time.time(), proc.busy_s)
        m = await proc.finalize_idle(0)
        await proc.store.r.aclose()
        return n, m

    n, m = asyncio.run(go())
    assert (n, m) == (0, 1)
