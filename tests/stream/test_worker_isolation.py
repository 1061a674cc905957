"""A message that makes processing fail (a bug, not bad input) is isolated and dead-lettered;
the rest of its batch is processed. Real Redis, real model code (tiny); the fault is injected."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis
import torch

from model.modeling import EmotionSIModel
from model.scorer import Scorer
from stream.settings import Settings
from stream.worker.state_store import StateStore
from stream.worker.batch import BatchProcessor
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

        def compute(convs, inputs, *rest):  # injected bug: any input with "boom" in it
            if any(getattr(x, "text", "") == "boom" for x in inputs):
                raise ZeroDivisionError("injected")
            return real(convs, inputs, *rest)

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


def _batch(msgs):
    return [(m["conversation_id"].encode(), json.dumps(m).encode(), 0, i) for i, m in enumerate(msgs)]


def test_a_refused_dead_letter_does_not_take_its_batch_with_it(stack):
    """The producer refuses a record for its size (faust wraps MessageSizeTooLargeError in a
    ProducerSendError): the dead letter goes out again without the bytes, the rest of the batch is
    processed, and process() does not raise (a raise would restart the agent past the batch)."""
    from aiokafka.errors import MessageSizeTooLargeError
    from faust.exceptions import ProducerSendError

    torch.manual_seed(0)
    scorer = Scorer.from_model(EmotionSIModel(tiny_config()), "tiny", "1")
    settings = Settings(app_id="isolation-size-test", dlq_max_bytes=500_000, max_message_bytes=1000)
    sent: list[tuple[str, dict]] = []

    async def publish(topic, key, value):
        if len(value) > 50_000:
            try:
                raise MessageSizeTooLargeError("too large")
            except MessageSizeTooLargeError as exc:
                raise ProducerSendError(f"Error while sending: {exc!r}") from exc
        sent.append((topic, json.loads(value)))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    async def go():
        store = StateStore(aioredis.from_url(stack.redis_url), 60, prefix="em:isolation-size-test")
        proc = BatchProcessor(settings, scorer, store, publish)
        msgs = [{"conversation_id": "a", "seq": 0, "speaker": "s", "text": "hello"},
                {"conversation_id": "b", "seq": 0, "speaker": "s", "text": "y" * 200_000},
                {"conversation_id": "c", "seq": 0, "speaker": "s", "text": "hi"}]
        await proc.process(_batch(msgs))
        await store.r.aclose()

    asyncio.run(go())
    dlq = [v for t, v in sent if t == settings.dlq_topic]
    events = [v for t, v in sent if t == settings.emotions_topic]
    assert [(d["error"], d["offset"], d["value_b64"], d["value_truncated"]) for d in dlq] == [("message_too_large", 1, "", True)]
    assert dlq[0]["value_size"] > 200_000 and len(dlq[0]["value_sha256"]) == 64
    assert sorted(e["conversation_id"] for e in events if e["status"] == "provisional") == ["a", "c"]


def test_producer_errors_are_classified():
    from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError, RecordTooLargeError
    from faust.exceptions import ProducerSendError

    from stream.worker.failures import is_record_error, is_transient

    def wrapped(exc):
        try:
            raise exc
        except Exception as inner:  # noqa: BLE001
            try:
                raise ProducerSendError(repr(inner)) from inner
            except ProducerSendError as outer:
                return outer

    assert is_record_error(wrapped(MessageSizeTooLargeError())) and not is_transient(wrapped(MessageSizeTooLargeError()))
    assert is_record_error(RecordTooLargeError()) and not is_transient(RecordTooLargeError())
    assert is_transient(wrapped(KafkaConnectionError())) and is_transient(KafkaConnectionError())
    assert not is_transient(ProducerSendError("no transaction producer")) and not is_transient(ZeroDivisionError())
