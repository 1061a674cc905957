"""The worker through a real broker and a real Redis, with the real model code (tiny config)."""

from __future__ import annotations

import base64
import json
from collections import defaultdict

import numpy as np
import pytest

from model.artifact import load_artifact
from model.dialogue import Dialogue, Utterance
from model.offline import score_dialogues
from model.encoders import load_tokenizer
from stream.core.contract import validate_event
from stream.kafka import create_topics
from tests.stream.worker_harness import WorkerProcess, collect, produce, run, unique_names, worker_env

pytestmark = pytest.mark.integration

# Raw dataset text, as producers send it (not cleaned up): curly quotes, MELD's Windows-1252
# \x92 apostrophe, double spaces, an ellipsis character. The worker must encode it exactly as
# training and `evaluate` do (model/encoding.py normalize_text), or streaming != offline.
LINES = [
    "I have been waiting for an hour,  this is ridiculous!",
    "I\u2019m sorry about the wait, let me look into it right away\u2026",
    "My card was charged twice for the same order.",
    "I can see that, I\x92m refunding the second charge now.",
    "Oh, thank you, that\u2019s a relief.",
    "Is there anything else I can help you with today?",
    "No, that\x92s all \u2014 have a \u201cnice\u201d day.",
]


def conversation(cid: str, n: int) -> list[dict]:
    return [{"conversation_id": cid, "seq": i, "speaker": f"{cid}-{'cust' if i % 2 == 0 else 'agent'}",
             "role": "customer" if i % 2 == 0 else "agent", "text": LINES[(i + len(cid)) % len(LINES)]} for i in range(n)]


def interleave(convs: list[list[dict]]) -> list[dict]:
    out, i = [], 0
    while any(i < len(c) for c in convs):
        out += [c[i] for c in convs if i < len(c)]
        i += 1
    return out


def end(cid: str) -> dict:
    return {"type": "end", "conversation_id": cid}


def offline_scores(artifact, convs: list[list[dict]]) -> dict[str, dict[tuple[str, int], np.ndarray]]:
    model, _ = load_artifact(artifact)
    dialogues = [Dialogue(c[0]["conversation_id"], tuple(Utterance(m["text"], m["speaker"], None) for m in c)) for c in convs]
    probs = score_dialogues(model, load_tokenizer(model.cfg), dialogues, modes=("final", "provisional"))
    keys = [(m["conversation_id"], m["seq"]) for c in convs for m in c]
    return {mode: dict(zip(keys, p)) for mode, p in probs.items()}


def scores(ev: dict, labels) -> np.ndarray:
    return np.array([ev["scores"][lab] for lab in labels])


def finals_of(events, cids) -> dict[tuple[str, int], set[str]]:
    out = defaultdict(set)
    for e in events:
        if e["status"] == "final" and e["conversation_id"] in cids:
            out[(e["conversation_id"], e["seq"])].add(e["event_id"])
    return out


@pytest.fixture(scope="module")
def worker(stack, tiny_artifact, tmp_path_factory):
    names = unique_names()
    run(create_topics(stack.bootstrap, {names["utterances"]: 3, names["emotions"]: 3, names["dlq"]: 1}))
    env = worker_env(stack, tiny_artifact, names, idle_finalize_s=2)
    w = WorkerProcess(env, tmp_path_factory.mktemp("w") / "worker.log")
    w.wait_ready()
    yield names, w
    w.stop()


def test_streaming_equals_offline_on_interleaved_conversations(stack, worker, tiny_artifact):
    names, w = worker
    convs = [conversation(f"eq-{k}", n) for k, n in enumerate([7, 5, 3, 1])]
    cids = {c[0]["conversation_id"] for c in convs}
    run(produce(stack.bootstrap, names["utterances"], interleave(convs) + [end(c) for c in sorted(cids)]))
    total = sum(len(c) for c in convs)
    events = run(collect(stack.bootstrap, names["emotions"], lambda ev: len(finals_of(ev, cids)) >= total, timeout_s=90))
    finals = finals_of(events, cids)
    assert len(finals) == total, w.tail()
    assert all(len(ids) == 1 for ids in finals.values())  # exactly one final event id per utterance
    expected = offline_scores(tiny_artifact, convs)
    labels = load_artifact(tiny_artifact)[0].cfg.emotion_labels
    mine = [e for e in events if e["conversation_id"] in cids]
    for e in mine:
        if e["status"] in ("final", "provisional"):
            # events carry scores rounded to 5 decimals
            np.testing.assert_allclose(scores(e, labels), expected[e["status"]][(e["conversation_id"], e["seq"])], atol=2e-5)
    provisional = {(e["conversation_id"], e["seq"]) for e in mine if e["status"] == "provisional"}
    assert provisional == set(expected["final"])
    assert all("text" not in e and e["model"] == {"name": "tiny", "version": "0.0.1"} for e in mine)
    for e in mine:
        validate_event(e, "emotion-event")
    # one summary per ended conversation, counting its final events
    summaries = run(collect(stack.bootstrap, names["summaries"], lambda r: len({x["conversation_id"] for x in r} & cids) >= 4))
    mine_s = {x["conversation_id"]: x for x in summaries if x["conversation_id"] in cids}
    assert {c: x["utterances"] for c, x in mine_s.items()} == {c[0]["conversation_id"]: len(c) for c in convs}
    for x in mine_s.values():
        validate_event(x, "summary")
        assert x["ended_by"] == "end" and [t["seq"] for t in x["trajectory"]] == list(range(x["utterances"]))


def test_bad_input_goes_to_the_dlq_and_the_worker_goes_on(stack, worker):
    names, w = worker
    good = conversation("dlq-ok", 3)
    raw_bad = [
        (b"dlq-ok", b"\xff\xfe\x00"),
        (b"dlq-ok", b"{broken json"),
        (b"dlq-ok", json.dumps({"conversation_id": "dlq-ok", "seq": 9, "speaker": "x", "text": ""}).encode()),
        (b"dlq-ok", json.dumps({"conversation_id": "dlq-ok", "seq": "nine", "speaker": "x", "text": "hi"}).encode()),
        (b"dlq-ok", json.dumps({"conversation_id": "dlq-ok", "speaker": "x", "text": "hi"}).encode()),
        (b"dlq-ok", json.dumps({"conversation_id": "dlq-ok", "seq": 9, "speaker": "x", "text": "y" * 5000}).encode()),
        (b"dlq-ok", b"[1,2,3]"),
        (b"someone-else", json.dumps({"conversation_id": "dlq-ok", "seq": 9, "speaker": "x", "text": "hi"}).encode()),
    ]
    repeat_other = {**good[1], "text": "a different text with a repeated seq"}
    redelivered = good[1]
    msgs = [good[0], good[1], *raw_bad, redelivered, repeat_other, good[2], end("dlq-ok")]
    run(produce(stack.bootstrap, names["utterances"], msgs))
    dlq = run(collect(stack.bootstrap, names["dlq"], lambda r: len(r) >= len(raw_bad) + 1, timeout_s=60))
    assert sorted(r["error"] for r in dlq) == sorted(
        ["not_utf8", "invalid_json", "empty_text", "wrong_type", "missing_field", "text_too_long", "not_an_object",
         "key_mismatch", "seq_regression"]), w.tail()
    sent = {v for _, v in raw_bad}
    assert sent <= {base64.b64decode(r["value_b64"]) for r in dlq}  # the original bytes are kept
    assert all(r["reason"] and r["topic"] == names["utterances"] and r["offset"] >= 0 for r in dlq)
    for r in dlq:
        validate_event(r, "dlq")
    events = run(collect(stack.bootstrap, names["emotions"], lambda ev: len(finals_of(ev, {"dlq-ok"})) >= 3, timeout_s=60))
    finals = finals_of(events, {"dlq-ok"})
    assert sorted(finals) == [("dlq-ok", 0), ("dlq-ok", 1), ("dlq-ok", 2)] and all(len(v) == 1 for v in finals.values())
    # the redelivered copy of seq 1 was recognised: one provisional for it, not two
    assert sum(1 for e in events if e["conversation_id"] == "dlq-ok" and e["seq"] == 1 and e["status"] == "provisional") == 1


def test_idle_conversation_is_flushed_and_stays_open(stack, worker):
    names, w = worker
    conv = conversation("idle-1", 5)
    run(produce(stack.bootstrap, names["utterances"], conv[:4]))  # then a pause: no end message
    events = run(collect(stack.bootstrap, names["emotions"], lambda ev: len(finals_of(ev, {"idle-1"})) >= 4, timeout_s=60))
    assert sorted(finals_of(events, {"idle-1"})) == [("idle-1", i) for i in range(4)], w.tail()
    # the pause did not end it: the next utterance is scored, the end message brings the summary
    run(produce(stack.bootstrap, names["utterances"], conv[4:] + [end("idle-1")]))
    events = run(collect(stack.bootstrap, names["emotions"], lambda ev: len(finals_of(ev, {"idle-1"})) >= 5, timeout_s=60))
    finals = finals_of(events, {"idle-1"})
    assert sorted(finals) == [("idle-1", i) for i in range(5)] and all(len(v) == 1 for v in finals.values()), w.tail()
    summaries = run(collect(stack.bootstrap, names["summaries"], lambda r: any(x["conversation_id"] == "idle-1" for x in r)))
    assert [x["ended_by"] for x in summaries if x["conversation_id"] == "idle-1"] == ["end"]


def test_killed_worker_is_continued_by_another_with_the_same_results(stack, tiny_artifact, tmp_path):
    names = unique_names()
    run(create_topics(stack.bootstrap, {names["utterances"]: 3, names["emotions"]: 3, names["dlq"]: 1}))
    env = worker_env(stack, tiny_artifact, names, idle_finalize_s=30)
    convs = [conversation(f"kill-{k}", 6) for k in range(3)]
    cids = {c[0]["conversation_id"] for c in convs}
    first = [c[:3] for c in convs]
    rest = [c[3:] for c in convs]
    a = WorkerProcess(env, tmp_path / "a.log")
    try:
        a.wait_ready()
        run(produce(stack.bootstrap, names["utterances"], interleave(first)))
        seen = run(collect(stack.bootstrap, names["emotions"],
                           lambda ev: sum(e["status"] == "provisional" for e in ev) >= 9, timeout_s=90))
        assert sum(e["status"] == "provisional" for e in seen) >= 9, a.tail()
    finally:
        a.kill()  # SIGKILL mid-conversation: no clean shutdown, no offset commit on the way out
    b = WorkerProcess(env, tmp_path / "b.log")
    try:
        b.wait_ready()
        run(produce(stack.bootstrap, names["utterances"], interleave(rest) + [end(c) for c in sorted(cids)]))
        events = run(collect(stack.bootstrap, names["emotions"], lambda ev: len(finals_of(ev, cids)) >= 18, timeout_s=90))
    finally:
        b.stop()
    finals = finals_of(events, cids)
    assert len(finals) == 18, b.tail()
    assert all(len(ids) == 1 for ids in finals.values())  # a repeat may only carry the identical id
    expected = offline_scores(tiny_artifact, convs)["final"]
    labels = load_artifact(tiny_artifact)[0].cfg.emotion_labels
    last = {}
    for e in events:
        if e["status"] == "final":
            last[(e["conversation_id"], e["seq"])] = e
    for key, e in last.items():  # context survived the kill: same numbers as one uninterrupted run
        np.testing.assert_allclose(scores(e, labels), expected[key], atol=2e-5)
    assert not any(e["context_reset"] for e in events)


def test_metrics_and_health_endpoints(stack, worker):
    """Runs after the tests above on the same worker: their traffic shows in the counters."""
    import urllib.request

    names, w = worker
    base = f"http://127.0.0.1:{w.web_port}"
    assert json.loads(urllib.request.urlopen(f"{base}/healthz", timeout=5).read())["status"] == "ok"
    ready = json.loads(urllib.request.urlopen(f"{base}/readyz", timeout=5).read())
    assert ready["ready"] and ready["redis"] and ready["partitions"] == [0, 1, 2]
    text = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    assert values["emotion_monitor_utterances_in_total"] > 20
    assert values['emotion_monitor_events_out_total{status="final"}'] >= 19
    assert values['emotion_monitor_dlq_total{reason="invalid_json"}'] >= 1
    assert values["emotion_monitor_duplicates_total"] >= 1
    assert values['emotion_monitor_model_info{device="cpu",name="tiny",version="0.0.1"}'] == 1
    assert any(k.startswith('emotion_monitor_stage_seconds_count{stage="encode"}') for k in values)
    assert values['python_gc_collections_total{generation="0"}'] > 0 and values["process_resident_memory_bytes"] > 1e8


def test_fuzzed_garbage_all_lands_in_the_dlq(stack, worker):
    """200 random invalid messages: every one is in the DLQ with a reason, the worker lives on."""
    import random

    from stream.core.validate import Rejected, parse_message

    names, w = worker
    rng = random.Random(99)
    msgs = []
    while len(msgs) < 200:
        value = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60)))
        key = rng.choice([b"fz", None, b"other"])
        if isinstance(parse_message(value, key, 64_000, 4000), Rejected):
            msgs.append((key, value))
    run(produce(stack.bootstrap, names["utterances"], msgs))
    wanted = {v for _, v in msgs}
    dlq = run(collect(stack.bootstrap, names["dlq"],
                      lambda r: len(wanted & {base64.b64decode(x["value_b64"]) for x in r}) >= len(wanted), timeout_s=60))
    got = [x for x in dlq if base64.b64decode(x["value_b64"]) in wanted]
    assert len({base64.b64decode(x["value_b64"]) for x in got}) == len(wanted) and all(x["reason"] for x in got)
    assert w.proc.poll() is None, w.tail()
