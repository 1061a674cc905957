"""Faults a production call-center sees: Redis restarts, a second worker joining mid-stream.

Real broker, real redis-server processes, real worker processes (tiny model); bounded in time.
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import pytest

from model.artifact import load_artifact
from stream.localstack import create_topics, start_redis, stop_process
from tests.stream.test_worker_integration import conversation, end, finals_of, interleave, offline_scores, scores
from tests.stream.worker_harness import WorkerProcess, collect, produce, run, unique_names, worker_env

pytestmark = [pytest.mark.integration, pytest.mark.faults]


def _topics(stack, names):
    run(create_topics(stack.bootstrap, {names["utterances"]: 3, names["emotions"]: 3, names["dlq"]: 1}))


def _check_same_as_offline(events, convs, artifact):
    expected = offline_scores(artifact, convs)["final"]
    labels = load_artifact(artifact)[0].cfg.emotion_labels
    for e in events:
        if e["status"] == "final":
            np.testing.assert_allclose(scores(e, labels), expected[(e["conversation_id"], e["seq"])], atol=2e-5)


@pytest.mark.parametrize("appendonly", [True, False], ids=["aof-kept", "state-lost"])
def test_redis_restart_mid_conversation(stack, tiny_artifact, tmp_path, appendonly):
    names = unique_names()
    _topics(stack, names)
    redis_proc, port = start_redis(tmp_path / "redis", appendonly=appendonly)
    env = worker_env(stack, tiny_artifact, names, idle_finalize_s=30, redis_url=f"redis://127.0.0.1:{port}/0")
    convs = [conversation(f"rr-{appendonly}-{k}", 6) for k in range(2)]
    cids = {c[0]["conversation_id"] for c in convs}
    w = WorkerProcess(env, tmp_path / "w.log")
    try:
        run(produce(stack.bootstrap, names["utterances"], interleave([c[:3] for c in convs])))
        seen = run(collect(stack.bootstrap, names["emotions"], lambda ev: sum(e["status"] == "provisional" for e in ev) >= 6, 90))
        assert sum(e["status"] == "provisional" for e in seen) >= 6, w.tail()
        stop_process(redis_proc)  # Redis goes away...
        run(produce(stack.bootstrap, names["utterances"], interleave([c[3:4] for c in convs])))
        time.sleep(2)  # ...while utterances keep coming: the worker retries, it does not die
        assert w.proc.poll() is None, w.tail()
        redis_proc, _ = start_redis(tmp_path / "redis", appendonly=appendonly, port=port)
        run(produce(stack.bootstrap, names["utterances"], interleave([c[4:] for c in convs]) + [end(c) for c in sorted(cids)]))
        # With the state kept, every utterance gets its final. With the state lost, the utterances
        # that were still pending in it (seq 1 and 2: awaiting their lookahead) cannot be finalised:
        # their provisional events stand; everything from the reset on is final as usual.
        want = 12 if appendonly else 8
        events = run(collect(stack.bootstrap, names["emotions"], lambda ev: len(finals_of(ev, cids)) >= want, 90))
    finally:
        w.stop()
        stop_process(redis_proc)
    mine = [e for e in events if e["conversation_id"] in cids]
    finals = finals_of(mine, cids)
    assert all(len(v) == 1 for v in finals.values()), w.tail()
    assert "retrying" in w.log.read_text()
    assert w.proc.returncode is not None  # stopped by us, not crashed earlier (poll checked above)
    if appendonly:  # state survived: same numbers as an uninterrupted run, no reset
        assert len(finals) == 12, w.tail()
        _check_same_as_offline(mine, convs, tiny_artifact)
        assert not any(e["context_reset"] for e in mine)
    else:  # state gone: the conversation goes on from seq 3, flagged
        assert sorted(s for _, s in finals) == [0, 0, 3, 3, 4, 4, 5, 5], w.tail()
        assert all(e["context_reset"] for e in mine if e["seq"] >= 3)
        assert not any(e["context_reset"] for e in mine if e["seq"] < 3)


def test_second_worker_joins_mid_stream(stack, tiny_artifact, tmp_path):
    """A rebalance while conversations are live: nothing lost, order kept, same results."""
    names = unique_names()
    _topics(stack, names)
    env = worker_env(stack, tiny_artifact, names, idle_finalize_s=30)
    convs = [conversation(f"rb-{k}", 8) for k in range(6)]
    cids = {c[0]["conversation_id"] for c in convs}
    a = WorkerProcess(env, tmp_path / "a.log")
    b = None
    try:
        run(produce(stack.bootstrap, names["utterances"], interleave([c[:3] for c in convs])))
        run(collect(stack.bootstrap, names["emotions"], lambda ev: sum(e["status"] == "provisional" for e in ev) >= 18, 90))
        b = WorkerProcess({**env, "EMOTION_MONITOR_WEB_PORT": str(int(env["EMOTION_MONITOR_WEB_PORT"]) + 1)}, tmp_path / "b.log")
        # keep producing through the rebalance
        run(produce(stack.bootstrap, names["utterances"], interleave([c[3:] for c in convs]), pause_s=0.15))
        run(produce(stack.bootstrap, names["utterances"], [end(c) for c in sorted(cids)]))
        events = run(collect(stack.bootstrap, names["emotions"], lambda ev: len(finals_of(ev, cids)) >= 48, 120))
    finally:
        a.stop()
        if b:
            b.stop()
    mine = [e for e in events if e["conversation_id"] in cids]
    finals = finals_of(mine, cids)
    assert len(finals) == 48 and all(len(v) == 1 for v in finals.values()), a.tail() + (b.tail() if b else "")
    order = defaultdict(list)
    for e in mine:
        if e["status"] == "provisional":
            order[e["conversation_id"]].append(e["seq"])
    for cid, seqs in order.items():  # per-conversation order kept (a repeat after the rebalance may appear)
        firsts = list(dict.fromkeys(seqs))
        assert firsts == sorted(firsts), (cid, seqs)
    _check_same_as_offline(mine, convs, tiny_artifact)
    assert "Elected group leader" in a.log.read_text() + b.log.read_text()


def test_broker_restart_worker_reconnects_and_resumes(stack, tiny_artifact, tmp_path):
    """The embedded broker keeps everything in memory: after a restart the topics are recreated
    empty. The worker must reconnect and go on with new traffic (its Redis state is intact)."""
    from stream.localstack import start_broker

    broker, port = start_broker(tmp_path / "broker")
    bootstrap = f"127.0.0.1:{port}"
    names = unique_names()
    topics = {names["utterances"]: 3, names["emotions"]: 3, names["dlq"]: 1, names["alerts"]: 3, names["summaries"]: 3}
    run(create_topics(bootstrap, topics))
    env = worker_env(stack, tiny_artifact, names, idle_finalize_s=30, brokers=f"kafka://{bootstrap}")
    w = WorkerProcess(env, tmp_path / "w.log")
    try:
        run(produce(bootstrap, names["utterances"], conversation("br-1", 3)))
        first = run(collect(bootstrap, names["emotions"], lambda ev: sum(e["status"] == "provisional" for e in ev) >= 3, 90))
        assert sum(e["status"] == "provisional" for e in first) >= 3, w.tail()
        stop_process(broker)
        time.sleep(3)
        broker, _ = start_broker(tmp_path / "broker", port=port)
        run(create_topics(bootstrap, topics))
        run(produce(bootstrap, names["utterances"], conversation("br-2", 4) + [end("br-2")]))
        events = run(collect(bootstrap, names["emotions"], lambda ev: len(finals_of(ev, {"br-2"})) >= 4, 120))
        assert sorted(finals_of(events, {"br-2"})) == [("br-2", i) for i in range(4)], w.tail(80)
        assert w.proc.poll() is None
    finally:
        w.stop()
        stop_process(broker)
