"""Batches in flight: the next batch is computed while the last one's acks and state write are
pending. Real Redis and real model code (tiny); the broker's acks are futures the test resolves,
so the interleaving is deterministic."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis
import torch

from model.modeling import EmotionSIModel
from model.runtime import Scorer
from stream.settings import Settings
from stream.state_store import StateStore
from stream.worker import BatchProcessor
from tests.conftest import tiny_config

pytestmark = pytest.mark.integration


def test_offsets_wait_for_the_state_write_and_the_next_batch_sees_the_state_in_flight(stack):
    torch.manual_seed(0)
    scorer = Scorer.from_model(EmotionSIModel(tiny_config()), "tiny", "1")
    settings = Settings(app_id="pipeline-test", pipeline_depth=2)
    sent: list[tuple[str, dict]] = []
    acks: list[asyncio.Future] = []
    done: list[str] = []

    async def publish(topic, key, value):
        sent.append((topic, json.loads(value)))
        acks.append(asyncio.get_running_loop().create_future())  # the broker has not answered yet
        return acks[-1]

    def msg(seq: int, offset: int):
        m = {"conversation_id": "p", "seq": seq, "speaker": f"s{seq % 2}", "text": f"utterance {seq}"}
        return (b"p", json.dumps(m).encode(), 0, offset)

    async def go():
        store = StateStore(aioredis.from_url(stack.redis_url), 60, prefix="em:pipeline-test")
        proc = BatchProcessor(settings, scorer, store, publish)
        await proc.submit([msg(0, 0)], lambda: done.append("batch 1"))
        # batch 1's events are queued, the broker has not acked: no state in Redis, offsets held
        assert done == [] and (await store.load(["p"]))["p"] is None
        second = asyncio.create_task(proc.submit([msg(1, 1)], lambda: done.append("batch 2")))
        while not any(t == settings.emotions_topic and e["seq"] == 1 for t, e in sent):
            await asyncio.sleep(0.01)
        # batch 2 is computed and queued (from batch 1's state, still only in memory); with
        # depth 2 its submit waits for batch 1 to finish
        await asyncio.sleep(0.05)
        assert not second.done() and done == [] and (await store.load(["p"]))["p"] is None
        for fut in list(acks):
            fut.set_result(None)
        await second
        await proc.drain()
        assert done == ["batch 1", "batch 2"]  # in batch order, each after its acks and its write
        state = (await store.load(["p"]))["p"]
        assert state.last_seq == 1 and not state.context_reset and not proc.inflight
        await store.r.aclose()

    asyncio.run(asyncio.wait_for(go(), 60))
    events = [e for t, e in sent if t == settings.emotions_topic]
    # batch 2 was computed from batch 1's state while that was still in flight: no reset, no DLQ
    assert [e["seq"] for e in events if e["status"] == "provisional"] == [0, 1]
    assert not any(e["context_reset"] for e in events) and not [1 for t, _ in sent if t == settings.dlq_topic]
