"""Issue 13, "Data loss": pauses, an oversized message and Redis refusing writes lose no valid utterance.

Real broker, real redis-server, real worker processes (tiny model); bounded in time.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from model.artifact import load_artifact
from stream.contract import validate_event
from stream.localstack import create_topics
from tests.stream.test_worker_integration import conversation, end, finals_of, offline_scores, scores
from tests.stream.worker_harness import WorkerProcess, collect, produce, run, unique_names, worker_env

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
    from aiokafka import AIOKafkaProducer

    p = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, linger_ms=50,
                         max_request_size=4 * 2**20)
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
