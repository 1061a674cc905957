"""stream.tools.localstack against the real processes: Tansu broker + redis-server (no mocks)."""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from stream.tools.localstack import (
    LocalStack,
    local_stack,
    start_redis,
    start_stack,
    stop_process,
)

pytestmark = pytest.mark.integration

TOPICS = {"ls-three": 3, "ls-one": 1}


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def stack():
    with local_stack(TOPICS) as st:
        yield st


async def _partitions(bootstrap: str) -> dict[str, int]:
    from aiokafka import AIOKafkaClient

    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    try:
        md = await client.fetch_all_metadata()  # no auto-creation: only what exists
        return {t: len(md.partitions_for_topic(t)) for t in md.topics()}
    finally:
        await client.close()


def test_stack_addresses(stack: LocalStack):
    assert stack.bootstrap == f"127.0.0.1:{stack.kafka_port}"
    assert stack.redis_url == f"redis://127.0.0.1:{stack.redis_port}/0"
    assert (stack.workdir / "tansu.log").exists() and (stack.workdir / "redis.log").exists()


def test_topics_created_with_partition_count(stack: LocalStack):
    parts = asyncio.run(_partitions(stack.bootstrap))
    assert {t: parts.get(t) for t in TOPICS} == TOPICS


def test_produce_then_consume(stack: LocalStack):
    from stream import kafka

    async def roundtrip() -> list[tuple[bytes, bytes]]:
        producer = kafka.producer(stack.bootstrap)  # not idempotent: Tansu lacks it
        await producer.start()
        try:
            for i in range(3):
                await producer.send_and_wait("ls-three", f"v{i}".encode(), key=b"conv-1")
        finally:
            await producer.stop()
        # A consumer group with short timeouts: the first join takes about half the session timeout.
        consumer = kafka.consumer("ls-three", bootstrap=stack.bootstrap, group_id=f"ls-test-{uuid.uuid4().hex[:8]}",
                                  session_timeout_ms=2000, heartbeat_interval_ms=300, fetch_max_wait_ms=50)
        await consumer.start()
        got = []
        try:
            async def drain():
                async for msg in consumer:
                    got.append((msg.key, msg.value))
                    if len(got) == 3:
                        return
            await asyncio.wait_for(drain(), timeout=15)
        finally:
            await consumer.stop()
        return got

    got = asyncio.run(roundtrip())
    # same key -> same partition -> order kept
    assert got == [(b"conv-1", b"v0"), (b"conv-1", b"v1"), (b"conv-1", b"v2")]


def test_redis_set_get(stack: LocalStack):
    r = redis.Redis.from_url(stack.redis_url)
    try:
        assert r.set("ls:k", "v", ex=60)
        assert r.get("ls:k") == b"v"
    finally:
        r.close()


def test_stop_kills_both_processes_and_is_idempotent(tmp_path):
    st = start_stack(workdir=tmp_path)
    pids = (st.broker_pid, st.redis_pid)
    assert not any(_gone(p) for p in pids)
    st.stop()
    assert all(_gone(p) for p in pids)
    st.stop()  # second call is a no-op
    assert tmp_path.exists()  # a caller-given workdir is kept (it holds the logs)


def test_redis_password_required():
    # retry=0: redis-py 8 counts AuthenticationError as a ConnectionError and by default retries
    # it with backoff (~4 s per refusal). protocol=2 so the SET itself is sent and refused
    # (with RESP3 the HELLO handshake is refused first).
    no_retry = Retry(NoBackoff(), 0)
    with local_stack(redis_password="s3cret") as st:
        anon = redis.Redis(host="127.0.0.1", port=st.redis_port, protocol=2, retry=no_retry)
        with pytest.raises(redis.AuthenticationError, match="Authentication required"):
            anon.set("k", "v")
        anon.close()
        wrong = redis.Redis(host="127.0.0.1", port=st.redis_port, password="nope", retry=no_retry)
        with pytest.raises(redis.AuthenticationError):
            wrong.ping()
        wrong.close()
        assert st.redis_url == f"redis://:s3cret@127.0.0.1:{st.redis_port}/0"
        ok = redis.Redis.from_url(st.redis_url)  # the URL carries the password
        assert ok.set("k", "v") and ok.get("k") == b"v"
        ok.close()


def test_redis_restart_on_same_port_keeps_appendonly_data(tmp_path):
    proc, port = start_redis(tmp_path, appendonly=True)
    try:
        r = redis.Redis(host="127.0.0.1", port=port)
        r.set("survives", "yes")
        r.close()
    finally:
        stop_process(proc)  # SIGTERM: a clean shutdown flushes the append-only file
    proc, port2 = start_redis(tmp_path, appendonly=True, port=port)
    try:
        assert port2 == port
        r = redis.Redis(host="127.0.0.1", port=port)
        assert r.get("survives") == b"yes"
        r.close()
    finally:
        stop_process(proc)
