"""Any Kafka client: librdkafka (confluent-kafka) producers and consumers against a real worker.

The same conversations are produced three times, each time to a fresh worker (own topics, own
Redis database): by aiokafka (the project's own path), by a librdkafka producer with
`partitioner: murmur2_random` (the partition a Java producer picks) and by one with librdkafka's
default (`consistent_random`, CRC32 of the key). A librdkafka consumer reads `emotions` with
`assign()` (a group join on the local broker takes ~23 s) from the beginning. The events must be
the same: same event ids, same scores, whichever client sent the utterances and however their
keys were spread over the partitions.
"""

from __future__ import annotations

import json
import time
import uuid
import zlib

import pytest

from stream.kafka import create_topics
from tests.stream.worker_harness import WorkerProcess, collect, produce, run, unique_names, worker_env

ck = pytest.importorskip("confluent_kafka", reason="confluent-kafka is in the dev extra (pip install -e '.[dev]')")

pytestmark = [pytest.mark.integration, pytest.mark.interop]

PARTITIONS = 3
TEXTS = ["I've been waiting for an hour.", "I'm sorry to hear that, let me check.", "This is ridiculous!",
         "I understand, I can refund it today.", "Oh, great, thank you so much."]


def conversations(tag: str, n: int = 8) -> list[dict]:
    """n interleaved calls (5 utterances each), then an end message each."""
    msgs = []
    for seq, text in enumerate(TEXTS):
        for c in range(n):
            role = "customer" if seq % 2 == 0 else "agent"
            msgs.append({"conversation_id": f"ix-{tag}-{c}", "seq": seq, "speaker": f"{role}-{c}", "role": role,
                         "text": f"{text} (call {c})"})
    msgs += [{"type": "end", "conversation_id": f"ix-{tag}-{c}", "last_seq": len(TEXTS) - 1} for c in range(n)]
    return msgs


def rd_produce(bootstrap: str, topic: str, messages: list[dict], partitioner: str) -> dict[bytes, int]:
    """Produce with librdkafka; returns key -> partition as the delivery reports say."""
    producer = ck.Producer({"bootstrap.servers": bootstrap, "partitioner": partitioner, "acks": "all",
                            "linger.ms": 5, "enable.idempotence": False})
    placed: dict[bytes, int] = {}
    errors: list = []

    def delivered(err, msg):
        if err is not None:
            errors.append(err)
        else:
            placed[msg.key()] = msg.partition()

    for m in messages:
        m = {**m, "ts": time.time()} if "seq" in m else m
        producer.produce(topic, value=json.dumps(m).encode(), key=m["conversation_id"].encode(), on_delivery=delivered)
        producer.poll(0)
    assert producer.flush(30) == 0, "librdkafka did not deliver everything within 30 s"
    assert not errors, errors
    return placed


def rd_consume(bootstrap: str, topic: str, until, timeout_s: float = 120.0) -> list[tuple[bytes, dict]]:
    """Read `topic` from the beginning with a librdkafka consumer on explicitly assigned partitions."""
    consumer = ck.Consumer({"bootstrap.servers": bootstrap, "group.id": f"interop-{uuid.uuid4().hex[:8]}",
                            "enable.auto.commit": False, "auto.offset.reset": "earliest", "fetch.wait.max.ms": 10})
    consumer.assign([ck.TopicPartition(topic, p, ck.OFFSET_BEGINNING) for p in range(PARTITIONS)])
    got: list[tuple[bytes, dict]] = []
    try:
        end = time.time() + timeout_s
        while time.time() < end and not until([e for _, e in got]):
            for msg in consumer.consume(num_messages=500, timeout=0.3):
                if msg.error() is None:
                    got.append((msg.key(), json.loads(msg.value())))
                elif msg.error().code() != ck.KafkaError._PARTITION_EOF:
                    raise ck.KafkaException(msg.error())
    finally:
        consumer.close()
    return got


def murmur2_partition(key: bytes, n: int) -> int:
    """The Java producer's default partition for a key (aiokafka implements the same hash)."""
    from aiokafka.partitioner import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % n


@pytest.fixture(scope="module")
def runs(stack, tiny_artifact, tmp_path_factory):
    """The same calls through three producers, each to its own worker; events read by librdkafka."""
    tag = uuid.uuid4().hex[:6]
    messages = conversations(tag)
    n_utts = sum("seq" in m for m in messages)
    results = {}
    for db, client in enumerate(("aiokafka", "murmur2_random", "consistent_random"), start=1):
        names = unique_names()
        run(create_topics(stack.bootstrap, {names["utterances"]: PARTITIONS, names["emotions"]: PARTITIONS,
                                            names["dlq"]: 1}))
        redis_url = stack.redis_url.rsplit("/", 1)[0] + f"/{db}"  # own Redis database: same ids, fresh state
        env = worker_env(stack, tiny_artifact, names, partitions=PARTITIONS)
        env["EMOTION_MONITOR_REDIS_URL"] = redis_url
        worker = WorkerProcess(env, tmp_path_factory.mktemp(client) / "worker.log")
        try:
            worker.wait_ready()
            if client == "aiokafka":
                run(produce(stack.bootstrap, names["utterances"], messages))
                placed = None
            else:
                placed = rd_produce(stack.bootstrap, names["utterances"], messages, client)
            records = rd_consume(stack.bootstrap, names["emotions"],
                                 lambda evs: sum(e["status"] == "final" for e in evs) >= n_utts)
            baseline = (run(collect(stack.bootstrap, names["emotions"], lambda evs: len(evs) >= len(records), 30))
                        if client == "aiokafka" else None)
            worker.check()
        finally:
            worker.stop()
        results[client] = {"records": records, "placed": placed, "aiokafka_read": baseline, "log": worker.tail()}
    return {"n_utts": n_utts, "messages": messages, **results}


def _events(records):
    return {e["event_id"]: e for _, e in records}


def test_every_client_gets_every_final_with_the_conversation_as_key(runs):
    for client in ("aiokafka", "murmur2_random", "consistent_random"):
        records = runs[client]["records"]
        finals = {(e["conversation_id"], e["seq"]) for _, e in records if e["status"] == "final"}
        assert len(finals) == runs["n_utts"], (client, runs[client]["log"])
        assert all(key == e["conversation_id"].encode() for key, e in records), client


def test_librdkafka_partitioners_place_keys_as_documented(runs):
    keys = {m["conversation_id"].encode() for m in runs["messages"]}
    murmur, crc = runs["murmur2_random"]["placed"], runs["consistent_random"]["placed"]
    assert murmur == {k: murmur2_partition(k, PARTITIONS) for k in keys}  # = Java's (and aiokafka's) default
    assert crc == {k: zlib.crc32(k) % PARTITIONS for k in keys}  # librdkafka's default
    assert murmur != crc, "pick keys the two partitioners spread differently, or the test proves nothing"


def test_results_equal_the_aiokafka_path(runs):
    base = _events(runs["aiokafka"]["records"])
    assert base == _events([(None, e) for e in runs["aiokafka"]["aiokafka_read"]])  # both consumers read the same
    for client in ("murmur2_random", "consistent_random"):
        other = _events(runs[client]["records"])
        assert other.keys() == base.keys(), client  # same event ids: same statuses, seqs, revisions
        for eid, e in other.items():
            b = base[eid]
            assert (e["conversation_id"], e["seq"], e["status"], e["emotion"]) == (b["conversation_id"], b["seq"],
                                                                                   b["status"], b["emotion"])
            assert e["scores"].keys() == b["scores"].keys()
            assert all(abs(e["scores"][k] - b["scores"][k]) <= 2e-5 for k in b["scores"]), (client, eid)
