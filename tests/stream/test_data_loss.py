"""Issue 13, "Data loss": pauses, an oversized message and Redis refusing writes lose no valid utterance.

Real broker, real redis-server, real worker processes (tiny model); bounded in time.
"""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest

from model.artifact import load_artifact
from stream.core.contract import validate_event
from stream.kafka import create_topics
from tests.stream.test_worker_integration import conversation, end, finals_of, offline_scores, scores
from tests.stream.worker_harness import WorkerProcess, collect, produce, readyz, run, unique_names, wait_for, worker_env

pytestmark = [pytest.mark.integration, pytest.mark.faults]

IDLE_S = 1.5
ABANDON_S = 8.0


def _topics(stack, names):
    run(create_topics(stack.bootstrap, {names["utterances"]: 3, names["emotions"]: 3, names["dlq"]: 1,
                                        names["summaries"]: 3, names["alerts"]: 3}))


@pytest.fixture(scope="module")
def worker(stack, tiny_artifact, tmp_path_factory):
    names = unique_names()
    _topics(stack, names)
    env = worker_env(stack, tiny_artifact, names, idle_finalize_s=IDLE_S, abandon_after_s=ABANDON_S)
    w = WorkerProcess(env, tmp_path_factory.mktemp("w") / "worker.log")
    w.wait_ready()
    yield names, w
    w.stop()


def _offline_with_flushes(artifact, conv: list[dict], segment_ends: list[int]) -> dict[int, np.ndarray]:
    """Offline scores (same model, same window) of what a flush promises: an utterance finalised by
    a flush has the latest scores before the pause, i.e. the offline `final` scores of the
    conversation up to the pause; every other utterance has those of the whole conversation."""
    expected = {}
    for end_seq in reversed(segment_ends):  # the earliest segment end wins
        prefix = offline_scores(artifact, [conv[: end_seq + 1]])["final"]
        expected.update({seq: v for (_, seq), v in prefix.items()})
    return expected


def test_pauses_longer_than_the_idle_timeout_keep_the_conversation_open(stack, worker, tiny_artifact):
    """Two holds longer than the idle timeout: each flushes the pending utterances (their finals come
    out during the pause), the call goes on with the same context, nothing goes to the DLQ."""
    names, w = worker
    cid = "hold-1"
    conv = conversation(cid, 8)
    segments = [conv[:3], conv[3:6], conv[6:]]
    events: list[dict] = []
    done = 0
    for k, seg in enumerate(segments[:2]):
        run(produce(stack.bootstrap, names["utterances"], seg))
        done += len(seg)
        # The pending utterances of the segment only become final through the flush: seeing every
        # final up to here proves the pause outlasted the idle timeout.
        events = run(collect(stack.bootstrap, names["emotions"], lambda ev: len(finals_of(ev, {cid})) >= done, 30))
        assert len(finals_of(events, {cid})) == done, f"no flush after pause {k + 1}\n" + w.tail()
    run(produce(stack.bootstrap, names["utterances"], segments[2] + [end(cid)]))
    events = run(collect(stack.bootstrap, names["emotions"], lambda ev: len(finals_of(ev, {cid})) >= 8, 30))
    mine = [e for e in events if e["conversation_id"] == cid]
    finals = finals_of(mine, {cid})
    assert sorted(s for _, s in finals) == list(range(8)), w.tail()
    assert all(len(ids) == 1 for ids in finals.values())  # exactly one final event id each
    assert sum(e["status"] == "final" for e in mine) == 8  # and emitted once
    # a final is never followed by another event for the same utterance (no revision after a flush)
    finalised = set()
    for e in mine:
        assert e["seq"] not in finalised, e
        if e["status"] == "final":
            finalised.add(e["seq"])
    assert not any(e["context_reset"] for e in mine)
    # scores: offline scoring of the conversation under the same window, with the flushes' horizons
    labels = load_artifact(tiny_artifact)[0].cfg.emotion_labels
    expected = _offline_with_flushes(tiny_artifact, conv, [2, 5, 7])
    whole = offline_scores(tiny_artifact, [conv])["final"]
    for e in mine:
        if e["status"] == "final":
            np.testing.assert_allclose(scores(e, labels), expected[e["seq"]], atol=2e-5)
    for seq in (0, 3):
        # seq 3 was scored after a pause with the context from before it: the same numbers as
        # scoring the whole conversation in one go (a context reset would differ)
        np.testing.assert_allclose(expected[seq], whole[(cid, seq)], atol=1e-6)
    # one summary, from the end message
    summaries = run(collect(stack.bootstrap, names["summaries"], lambda r: any(x["conversation_id"] == cid for x in r), 20))
    mine_s = [x for x in summaries if x["conversation_id"] == cid]
    assert [(x["ended_by"], x["utterances"]) for x in mine_s] == [("end", 8)]
    dlq = run(collect(stack.bootstrap, names["dlq"], lambda r: False, 2))
    assert [r for r in dlq if base64_key(r) == cid] == [], dlq


def base64_key(record: dict) -> str | None:
    import base64

    return base64.b64decode(record["key_b64"]).decode() if record.get("key_b64") else None


def test_a_silent_conversation_is_abandoned_with_its_summary(stack, worker):
    """No end message and no utterance for the abandonment timeout: pending finals (flushed at the
    idle timeout), then a summary with ended_by "abandoned"; a later utterance is dead-lettered."""
    names, w = worker
    cid = "gone-1"
    conv = conversation(cid, 4)
    run(produce(stack.bootstrap, names["utterances"], conv[:3]))
    summaries = run(collect(stack.bootstrap, names["summaries"], lambda r: any(x["conversation_id"] == cid for x in r),
                            ABANDON_S + 30))
    mine = [x for x in summaries if x["conversation_id"] == cid]
    assert [(x["ended_by"], x["utterances"]) for x in mine] == [("abandoned", 3)], w.tail()
    validate_event(mine[0], "summary")
    events = run(collect(stack.bootstrap, names["emotions"], lambda ev: len(finals_of(ev, {cid})) >= 3, 10))
    assert sorted(finals_of(events, {cid})) == [(cid, 0), (cid, 1), (cid, 2)]
    run(produce(stack.bootstrap, names["utterances"], conv[3:]))
    dlq = run(collect(stack.bootstrap, names["dlq"], lambda r: any(base64_key(x) == cid for x in r), 20))
    assert [x["error"] for x in dlq if base64_key(x) == cid] == ["conversation_ended"]


async def _produce_together(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    """Queue every message before waiting for any ack: they reach the worker in one fetch (one batch)."""
    from stream import kafka

    p = kafka.producer(bootstrap, linger_ms=50, max_request_size=4 * 2**20)
    await p.start()
    try:
        futures = [await p.send(topic, value, key=key) for key, value in messages]
        for f in futures:
            await f
    finally:
        await p.stop()


def test_an_oversized_message_does_not_take_its_batch_with_it(stack, worker):
    """A 1 MB value between valid utterances: the broker takes it, the worker dead-letters it with a
    capped record (prefix, size, SHA-256) and every valid utterance around it gets its events."""
    import base64
    import hashlib
    import time

    names, w = worker
    cid = "big-1"
    conv = conversation(cid, 4)
    big = json.dumps({"conversation_id": cid, "seq": 99, "speaker": "x", "text": "y" * 1_000_000}).encode()
    valid = [json.dumps({**m, "ts": time.time()}).encode() for m in conv]
    msgs = [(cid.encode(), v) for v in valid[:2]] + [(cid.encode(), big)] + [(cid.encode(), v) for v in valid[2:]]
    msgs.append((cid.encode(), json.dumps(end(cid)).encode()))
    run(_produce_together(stack.bootstrap, names["utterances"], msgs))
    events = run(collect(stack.bootstrap, names["emotions"], lambda ev: len(finals_of(ev, {cid})) >= 4, 40))
    finals = finals_of(events, {cid})
    assert sorted(finals) == [(cid, i) for i in range(4)] and all(len(v) == 1 for v in finals.values()), w.tail(60)
    dlq = run(collect(stack.bootstrap, names["dlq"], lambda r: any(base64_key(x) == cid for x in r), 20))
    mine = [x for x in dlq if base64_key(x) == cid]
    assert [x["error"] for x in mine] == ["message_too_large"], w.tail(60)
    rec = mine[0]
    validate_event(rec, "dlq")
    assert rec["value_truncated"] is True and rec["value_size"] == len(big)
    assert rec["value_sha256"] == hashlib.sha256(big).hexdigest()
    prefix = base64.b64decode(rec["value_b64"])
    assert 0 < len(prefix) < len(big) and big.startswith(prefix)
    assert len(json.dumps(rec)) < 200_000  # far below the producer's 1 MB request limit
    assert w.proc.poll() is None, w.tail()


def test_redis_refusing_writes_is_retried_not_dead_lettered(stack, tiny_artifact, tmp_path):
    """A real redis-server put under maxmemory 1 + noeviction (every write: OOM) mid-conversation:
    the worker publishes the batch's events once, retries the state write, says 503 on /readyz,
    dead-letters nothing; once Redis takes writes again every utterance gets its one final, with
    the same scores as an undisturbed run."""
    import time

    import redis

    from stream.tools.localstack import start_redis, stop_process
    from tests.stream.test_faults import _check_same_as_offline
    from tests.stream.test_worker_integration import LINES, interleave

    names = unique_names()
    _topics(stack, names)
    redis_proc, port = start_redis(tmp_path / "redis")
    admin = redis.Redis(port=port)
    env = worker_env(stack, tiny_artifact, names, idle_finalize_s=30, redis_url=f"redis://127.0.0.1:{port}/0")
    convs = [conversation(f"oom-{k}", 6) for k in range(2)]
    cids = {c[0]["conversation_id"] for c in convs}
    w = WorkerProcess(env, tmp_path / "w.log")
    web = int(env["EMOTION_MONITOR_WEB_PORT"])
    try:
        w.wait_ready()
        run(produce(stack.bootstrap, names["utterances"], interleave([c[:2] for c in convs])))
        seen = run(collect(stack.bootstrap, names["emotions"], lambda ev: sum(e["status"] == "provisional" for e in ev) >= 4, 90))
        assert sum(e["status"] == "provisional" for e in seen) >= 4, w.tail()
        assert readyz(web)[0] == 200
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", "1")  # every write is now refused with OOM
        run(produce(stack.bootstrap, names["utterances"], interleave([c[2:4] for c in convs])))
        assert wait_for(lambda: "Redis refuses writes (OOM" in w.log.read_text(), 30), w.tail()
        status, body = readyz(web)
        assert status == 503 and body["redis_writes"] == "refused (OOM)", body
        time.sleep(3)  # several retries with backoff
        assert w.proc.poll() is None, w.tail()
        admin.config_set("maxmemory", "0")  # Redis takes writes again
        # The retry waits at most 5 s between tries; the bound is for a slow machine, not a target.
        assert wait_for(lambda: readyz(web)[0] == 200, 60), f"{readyz(web)}\n{w.tail()}"
        run(produce(stack.bootstrap, names["utterances"], interleave([c[4:] for c in convs]) + [end(c) for c in sorted(cids)]))
        events = run(collect(stack.bootstrap, names["emotions"], lambda ev: len(finals_of(ev, cids)) >= 12, 60))
        dlq = run(collect(stack.bootstrap, names["dlq"], lambda r: False, 2))
    finally:
        w.stop()
        admin.config_set("maxmemory", "0")
        admin.close()
        stop_process(redis_proc)
    mine = [e for e in events if e["conversation_id"] in cids]
    finals = finals_of(mine, cids)
    assert len(finals) == 12 and all(len(v) == 1 for v in finals.values()), w.tail()
    assert dlq == [], dlq  # no valid message dead-lettered because Redis refused writes
    provisional = defaultdict(int)
    for e in mine:
        if e["status"] == "provisional":
            provisional[(e["conversation_id"], e["seq"])] += 1
    assert all(n == 1 for n in provisional.values()), provisional  # the events were not published again
    _check_same_as_offline(mine, convs, tiny_artifact)
    assert not any(e["context_reset"] for e in mine)
    log = w.log.read_text()
    assert "Redis accepts writes again" in log
    assert not any(line in log for line in LINES)  # no transcript text in the log


def test_a_read_only_replica_is_recognised_as_refusing_writes(tmp_path):
    """READONLY (a failover left the worker on a replica): a real redis-server under REPLICAOF."""
    import redis.asyncio as aioredis

    from stream.tools.localstack import start_redis, stop_process
    from stream.core.conversation import ConversationState
    from stream.worker.state_store import StateStore, StateWriteRefused
    from stream.tools.localstack import free_port

    proc, port = start_redis(tmp_path / "redis")

    async def go():
        r = aioredis.from_url(f"redis://127.0.0.1:{port}/0")
        store = StateStore(r, 60, prefix="em:ro")
        assert await store.probe_write() is None
        await r.replicaof("127.0.0.1", free_port())  # a primary that is not there: read-only replica
        try:
            assert await store.probe_write() == "READONLY"
            with pytest.raises(StateWriteRefused) as info:
                await store.save({"c": ConversationState()}, {"c": 0})
            assert info.value.code == "READONLY" and "SET" not in str(info.value)
            assert info.value.__cause__ is None  # the client's text (it quotes the state) is not chained
        finally:
            await r.replicaof("NO", "ONE")
        await store.save({"c": ConversationState()}, {"c": 0})
        await r.aclose()

    try:
        run(go())
    finally:
        stop_process(proc)
