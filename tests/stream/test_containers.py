"""The container path of the `stack` fixture (tests/stream/containers.py): chosen only when asked
for and Docker answers; the normal path never imports testcontainers."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from tests.stream import containers


def test_containers_only_when_asked_for_and_docker_answers(monkeypatch):
    probed = []
    monkeypatch.setattr(containers, "docker_available", lambda: probed.append(1) or True)
    monkeypatch.delenv(containers.ENV, raising=False)
    assert not containers.use_containers() and not probed  # not asked: Docker is not even probed
    monkeypatch.setenv(containers.ENV, "0")
    assert not containers.use_containers()
    monkeypatch.setenv(containers.ENV, "1")
    assert containers.use_containers() and probed
    monkeypatch.setattr(containers, "docker_available", lambda: False)
    assert not containers.use_containers()  # asked, but no Docker: the local stack


def test_the_normal_path_imports_neither_testcontainers_nor_docker():
    code = ("import sys, tests.stream.containers as c; c.use_containers(); "
            "assert not {'testcontainers', 'docker'} & set(sys.modules), sorted(sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2], env={"PATH": "/usr/bin:/bin", "PYTHONPATH": "."})
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.integration
@pytest.mark.skipif(not containers.use_containers(), reason=f"{containers.ENV}=1 and a Docker engine needed")
def test_the_container_stack_carries_a_message_and_a_key():
    import redis

    from stream import kafka

    async def roundtrip(bootstrap: str) -> bytes:
        await kafka.create_topics(bootstrap, {"tc-check": 1})
        producer = kafka.producer(bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait("tc-check", b"hello", key=b"k")
        finally:
            await producer.stop()
        consumer = kafka.consumer("tc-check", bootstrap=bootstrap)
        await consumer.start()
        try:
            return (await consumer.getone()).value
        finally:
            await consumer.stop()

    with containers.container_stack() as st:
        assert asyncio.run(roundtrip(st.bootstrap)) == b"hello"
        client = redis.Redis.from_url(st.redis_url)
        assert client.set("tc", "1") and client.get("tc") == b"1"
