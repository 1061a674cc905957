"""stream.tools.replay, stream.tools.watch and the JSON Schemas in stream/schemas/.

Unit tests need no broker; the integration tests run against the real local broker (Tansu).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import uuid
from collections import defaultdict
from pathlib import Path

import pytest

from stream.tools import replay as replay_mod
from stream.core.contract import SCHEMAS, load_schema, validate_event
from stream.tools.replay import SAMPLE, load_messages

jsonschema = pytest.importorskip("jsonschema")


def fake_event(cid: str = "call-1", seq: int = 0, status: str = "final", **over) -> dict:
    scores = {"neutral": 0.1, "joy": 0.05, "surprise": 0.05, "anger": 0.7, "sadness": 0.04, "disgust": 0.03, "fear": 0.03}
    event = {"event_id": uuid.uuid5(uuid.NAMESPACE_URL, f"{cid}/{seq}/{status}").hex, "conversation_id": cid, "seq": seq,
             "speaker": "customer-1", "role": "customer", "emotion": "anger", "scores": scores, "status": status,
             "model": {"name": "meld", "version": "test"}, "context_reset": False, "ts_produced": 1_700_000_000.0,
             "ts_received": 1_700_000_000.01, "ts_emitted": 1_700_000_000.02}
    event.update(over)
    return event


# ---- schemas -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SCHEMAS))
def test_schemas_are_valid_2020_12_with_descriptions(name):
    schema = load_schema(name)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)

    def walk(props, where):
        for field, sub in props.items():
            assert sub.get("description"), f"{name}: {where}{field} has no description"
            walk(sub.get("properties", {}), f"{where}{field}.")

    walk(schema["properties"], "")


def test_event_schema_accepts_a_well_formed_event_and_rejects_one_without_event_id():
    validate_event(fake_event(), "emotion-event")
    validate_event(fake_event(role=None, ts_produced=None, text="hello"), "emotion-event")
    event = fake_event()
    del event["event_id"]
    with pytest.raises(jsonschema.ValidationError, match="event_id"):
        validate_event(event, "emotion-event")
    for bad in (fake_event(status="maybe"), fake_event(event_id="XYZ"), fake_event(scores={"anger": 1.5})):
        with pytest.raises(jsonschema.ValidationError):
            validate_event(bad, "emotion-event")


def test_input_and_dlq_schemas():
    validate_event({"conversation_id": "c", "seq": 0, "speaker": "s", "text": "hi"}, "input")
    validate_event({"type": "end", "conversation_id": "c", "last_seq": 3}, "input")
    for bad in ({"conversation_id": "c", "seq": -1, "speaker": "s", "text": "hi"},
                {"conversation_id": "c", "seq": 0, "speaker": "s", "text": "   "},
                {"conversation_id": "c\n", "seq": 0, "speaker": "s", "text": "hi"},
                {"conversation_id": "c", "seq": "0", "speaker": "s", "text": "hi"}):
        with pytest.raises(jsonschema.ValidationError):
            validate_event(bad, "input")
    dlq = {"reason": "not JSON", "error": "invalid_json", "topic": "utterances", "partition": 0, "offset": 7,
           "key_b64": None, "value_b64": "e30=", "ts_received": 1.0}
    validate_event(dlq, "dlq")
    with pytest.raises(jsonschema.ValidationError):
        validate_event({**dlq, "error": "oops"}, "dlq")


def test_unknown_schema_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="emotion-event"):
        load_schema("nope")


# ---- load_messages: the bundled call-center sample ----------------------------------------

def _by_conversation(messages):
    convs = defaultdict(list)
    for m in messages:
        convs[m["conversation_id"]].append(m)
    return convs


def test_bundled_sample_is_well_formed():
    messages = load_messages(SAMPLE)
    convs = _by_conversation(messages)
    assert 6 <= len(convs) <= 8
    for cid, msgs in convs.items():
        *utts, end = msgs
        assert end == {"type": "end", "conversation_id": cid, "last_seq": len(utts) - 1}, cid
        assert 8 <= len(utts) <= 16
        assert [m["seq"] for m in utts] == list(range(len(utts))), cid
        assert {m["role"] for m in utts} == {"customer", "agent"}
        assert all("ts" not in m for m in msgs)  # replay stamps ts at send time
    for m in messages:
        validate_event(m, "input")
    # interleaved like a live call center, not one conversation after another
    firsts = [messages.index(convs[c][0]) for c in convs]
    lasts = [messages.index(convs[c][-1]) for c in convs]
    assert sorted(firsts)[1] < sorted(lasts)[0]


# ---- load_messages: MELD CSV ---------------------------------------------------------------

MELD_ROWS = [  # Dialogue_ID, Utterance_ID, Speaker, Utterance, StartTime (rows deliberately shuffled)
    (3, 2, "Monica", "Eww, that\u2019s disgusting.", "00:10:04,500"),
    (1, 0, "Chandler", "I\u2019m the point person on my company\u2019s transition.", "00:16:16,059"),
    (3, 0, "Phoebe", "What\u2019s that smell?", "00:10:00,000"),
    (1, 5, "All", "What?!", "00:16:40,000"),  # Utterance_ID gap and a 20 s pause
    (1, 1, "The Interviewer", "You must\u2019ve had your hands full.", "00:16:21,940"),
]


def write_meld(path: Path, rows=MELD_ROWS) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID",
                    "Season", "Episode", "StartTime", "EndTime"])
        for i, (d, u, spk, text, start) in enumerate(rows):
            w.writerow([i + 1, text, spk, "neutral", "neutral", d, u, 1, 1, start, start])
    return path


def test_meld_csv_becomes_ordered_conversations_with_end_messages(tmp_path):
    messages = load_messages(write_meld(tmp_path / "dev_sent_emo.csv"))
    assert [(m["conversation_id"], m.get("seq", m.get("type"))) for m in messages] == [
        ("meld-1", 0), ("meld-1", 1), ("meld-1", 2), ("meld-1", "end"), ("meld-3", 0), ("meld-3", 1), ("meld-3", "end")]
    assert messages[0] == {"conversation_id": "meld-1", "seq": 0, "speaker": "Chandler", "role": None,
                           "text": "I\u2019m the point person on my company\u2019s transition."}
    assert messages[2]["text"] == "What?!" and messages[3]["last_seq"] == 2
    assert messages[5]["text"] == "Eww, that\u2019s disgusting."  # curly apostrophe kept as text
    for m in messages:
        validate_event(m, "input")


def test_meld_pacing_uses_start_times_capped_per_gap(tmp_path):
    timed = replay_mod._load_timed(write_meld(tmp_path / "x.csv"))
    gaps = [round(g, 3) for g, _ in timed]
    # meld-1: first right away, 5.881 s capped to 5, 18.06 s capped to 5, end; meld-3: 0, 4.5, end
    assert gaps == [0.0, 5.0, 5.0, 0.0, 0.0, 4.5, 0.0]


def test_limit_keeps_whole_conversations():
    timed = replay_mod._first_conversations(replay_mod._load_timed(SAMPLE), 2)
    convs = _by_conversation([m for _, m in timed])
    assert len(convs) == 2
    assert all(msgs[-1].get("type") == "end" for msgs in convs.values())


def test_missing_file_and_unknown_format_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="call_center.jsonl"):
        load_messages(tmp_path / "nope.jsonl")
    (tmp_path / "calls.txt").write_text("hello")
    with pytest.raises(ValueError, match="MELD CSV"):
        load_messages(tmp_path / "calls.txt")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="missing column"):
        load_messages(tmp_path / "bad.csv")
    (tmp_path / "bad.jsonl").write_text('{"conversation_id": "c"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_messages(tmp_path / "bad.jsonl")


# ---- watch's formatting --------------------------------------------------------------------

def _render(text) -> str:
    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(text)
    return out.getvalue()


def test_event_line_shows_fields_but_no_text_unless_present():
    from stream.tools.watch import format_event

    line = _render(format_event(fake_event(seq=12, status="revised")))
    for part in ("call-1", "12", "customer-1 (customer)", "revised", "anger", "0.70", "20 ms"):
        assert part in line
    assert "“" not in line
    assert "I am upset" in _render(format_event(fake_event(text="I am upset")))
    # strings from the topic cannot restyle or corrupt the terminal
    hostile = _render(format_event(fake_event(speaker="[bold]x\x1b[31m", emotion="weird")))
    assert "[bold]x[31m" in hostile and "\x1b" not in hostile


# ---- against the real local broker --------------------------------------------------------

async def _consume_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 20.0):
    from stream import kafka

    consumer = kafka.consumer(topic, bootstrap=bootstrap)
    await consumer.start()
    got = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while len(got) < expected and asyncio.get_running_loop().time() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                got.extend(records)
    finally:
        await consumer.stop()
    return got


async def _produce(bootstrap: str, topic: str, events: list[dict]) -> None:
    from stream import kafka

    producer = kafka.producer(bootstrap)
    await producer.start()
    try:
        for e in events:
            await producer.send_and_wait(topic, json.dumps(e).encode(), key=e["conversation_id"].encode())
    finally:
        await producer.stop()


@pytest.fixture(scope="module")
def broker():
    localstack = pytest.importorskip("stream.tools.localstack")
    with localstack.local_stack(topics={"replay-it": 3, "watch-it": 2}) as stack:
        yield stack


@pytest.mark.integration
def test_replay_bundled_sample_round_trip(broker):
    from stream.tools.replay import replay

    stats = asyncio.run(replay(SAMPLE, broker.bootstrap, topic="replay-it", progress=False))
    sent = load_messages(SAMPLE)
    assert (stats.sent, stats.conversations) == (len(sent), len(_by_conversation(sent)))
    records = asyncio.run(_consume_all(broker.bootstrap, "replay-it", len(sent)))
    assert len(records) == len(sent)
    received = defaultdict(list)
    for r in records:
        msg = json.loads(r.value)
        assert r.key == msg["conversation_id"].encode()
        assert isinstance(msg.pop("ts"), float)
        received[msg["conversation_id"]].append(msg)
    assert received == _by_conversation(sent)  # every conversation complete and in order


@pytest.mark.integration
def test_watch_shows_produced_events_and_stops_at_max_events(broker):
    from rich.console import Console

    from stream.tools.watch import watch

    events = [fake_event("call-a", 0, "provisional"), fake_event("call-a", 0, "final"), fake_event("call-b", 0, "final")]
    for e in events:
        validate_event(e, "emotion-event")
    asyncio.run(_produce(broker.bootstrap, "watch-it", events))
    out = io.StringIO()
    seen = asyncio.run(watch(broker.bootstrap, topic="watch-it", max_events=3, timeout_s=30,
                             console=Console(file=out, width=200)))
    assert sorted(e["event_id"] for e in seen) == sorted(e["event_id"] for e in events)
    assert out.getvalue().count("anger") == 3
    finals = asyncio.run(watch(broker.bootstrap, topic="watch-it", final_only=True, conversation="call-a",
                               timeout_s=3, console=Console(file=io.StringIO())))
    assert [(e["conversation_id"], e["status"]) for e in finals] == [("call-a", "final")]
