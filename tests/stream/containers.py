"""Kafka and Redis in containers (testcontainers), for machines with a Docker engine.

The suite's broker and Redis come from here only when EMOTION_MONITOR_TEST_CONTAINERS=1 asks for
them and a Docker engine answers; otherwise (and on machines without Docker, like ours) the suite
starts a real Tansu broker and redis-server itself (stream.tools.localstack), as before.
testcontainers and docker are imported only on that path: the normal path never loads them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

ENV = "EMOTION_MONITOR_TEST_CONTAINERS"
KAFKA_IMAGE = "confluentinc/cp-kafka:7.6.0"  # KRaft: no ZooKeeper container
REDIS_IMAGE = "redis:7"


def wanted() -> bool:
    """Whether the environment asks for containers."""
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes")


def docker_available() -> bool:
    """Whether a Docker engine answers a ping (False without the docker package or an engine)."""
    try:
        import docker

        client = docker.from_env(timeout=5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - no package, no socket, no permission: no Docker
        return False


def use_containers() -> bool:
    """Containers only when asked for and Docker answers (Docker is probed only when asked)."""
    return wanted() and docker_available()


@dataclass(frozen=True)
class ContainerStack:
    """What the tests use of a stack (the same fields as stream.tools.localstack.LocalStack)."""

    bootstrap: str  # "host:port" (faust wants "kafka://" + this)
    redis_url: str


@contextlib.contextmanager
def container_stack() -> Iterator[ContainerStack]:
    """A Kafka broker (KRaft) and a Redis, each in a container, stopped and removed afterwards."""
    try:
        from testcontainers.community.kafka import KafkaContainer
        from testcontainers.community.redis import RedisContainer
    except ImportError:  # testcontainers before the community packages
        from testcontainers.kafka import KafkaContainer
        from testcontainers.redis import RedisContainer

    with KafkaContainer(KAFKA_IMAGE).with_kraft() as kafka, RedisContainer(REDIS_IMAGE) as redis:
        host, port = redis.get_container_host_ip(), redis.get_exposed_port(redis.port)
        yield ContainerStack(bootstrap=kafka.get_bootstrap_server(), redis_url=f"redis://{host}:{port}/0")
