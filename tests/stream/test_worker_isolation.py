"""A message that makes processing fail (a bug, not bad input) is isolated and dead-lettered;
the rest of its batch is processed. Real Redis, real model code (tiny); the fault is injected."""

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


def test_poison_message_is_isolated_and_dead_lettered(stack):
    torch.manual_seed(0)
    scorer = Scorer.from_model(EmotionSIModel(tiny_config()), "tiny", "1")
    settings = Settings(app_id="isolation-test")
    sent: list[tuple[str, dict]] = []

    async def publish(topic, key, value):
        sent.append((topic, json.loads(value)))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    async def go():
        store = StateStore(aioredis.from_url(stack.redis_url), 60, prefix="em:isolation-test")
        proc = BatchProcessor(settings, scorer, store, publish)
        real = proc._compute

        def compute(convs, inputs, now):  # injected bug: any input with "boom" in it
            if any(getattr(x, "text", "") == "boom" for x in inputs):
                raise ZeroDivisionError("injected")
            return real(convs, inputs, now)

        proc._compute = compute
        msgs = [{"conversation_id": c, "seq": 0, "speaker": "s", "text": t} for c, t in (("a", "hello"), ("b", "boom"), ("c", "hi"))]
        await proc.process([(m["conversation_id"].encode(), json.dumps(m).encode(), 0, i) for i, m in enumerate(msgs)])
        await store.r.aclose()

    asyncio.run(go())
    dlq = [v for t, v in sent if t == settings.dlq_topic]
    events = [v for t, v in sent if t == settings.emotions_topic]
    assert [(d["error"], d["offset"]) for d in dlq] == [("internal_error", 1)]
    assert "ZeroDivisionError" in dlq[0]["reason"]
    assert sorted(e["conversation_id"] for e in events if e["status"] == "provisional") == ["a", "c"]
