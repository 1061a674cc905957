import json

import pytest

from stream.core.validate import EndMessage, Rejected, UtteranceMessage, parse_message


def parse(obj, key=b"c1", raw=None):
    value = raw if raw is not None else json.dumps(obj).encode()
    return parse_message(value, key, max_message_bytes=2000, max_text_chars=100)


GOOD = {"conversation_id": "c1", "seq": 0, "speaker": "cust-1", "role": "customer", "text": "hello", "ts": 1.5}


def test_good_utterance_and_end():
    u = parse(GOOD)
    assert isinstance(u, UtteranceMessage) and u.seq == 0 and u.role == "customer" and u.ts == 1.5
    assert isinstance(parse({"type": "end", "conversation_id": "c1"}), EndMessage)
    # same content -> same digest; other text -> other digest (redelivery vs regression)
    assert parse(GOOD).digest == u.digest != parse({**GOOD, "text": "bye"}).digest


@pytest.mark.parametrize(
    "raw, obj, key, error",
    [
        (b"\xff\xfe not utf8", None, b"c1", "not_utf8"),
        (b"{not json", None, b"c1", "invalid_json"),
        (None, [1, 2], b"c1", "not_an_object"),
        (None, {k: v for k, v in GOOD.items() if k != "text"}, b"c1", "missing_field"),
        (None, {k: v for k, v in GOOD.items() if k != "conversation_id"}, b"c1", "missing_field"),
        (None, {**GOOD, "seq": "3"}, b"c1", "wrong_type"),
        (None, {**GOOD, "seq": True}, b"c1", "wrong_type"),
        (None, {**GOOD, "seq": -1}, b"c1", "wrong_type"),
        (None, {**GOOD, "speaker": 5}, b"c1", "wrong_type"),
        (None, {**GOOD, "ts": "yesterday"}, b"c1", "wrong_type"),
        (None, {**GOOD, "type": "shout"}, b"c1", "wrong_type"),
        (None, {**GOOD, "text": "   "}, b"c1", "empty_text"),
        (None, {**GOOD, "text": "x" * 101}, b"c1", "text_too_long"),
        (b"{" + b" " * 3000 + b"}", None, b"c1", "message_too_large"),
        (None, {**GOOD, "conversation_id": ""}, b"", "bad_conversation_id"),
        (None, GOOD, b"other", "key_mismatch"),
        (None, GOOD, None, "key_mismatch"),
        (b'{"conversation_id":"c1","seq":0,"speaker":"a","text":"\\ud800"}', None, b"c1", "not_utf8"),
    ],
)
def test_bad_input_is_rejected_with_a_code_and_a_reason(raw, obj, key, error):
    r = parse(obj, key=key, raw=raw)
    assert isinstance(r, Rejected) and r.error == error and len(r.reason) > 5


@pytest.mark.parametrize("seq", [2**53, 2**63, 2**64 + 5, 10**30])
def test_seq_is_bounded(seq):
    """2^63 was accepted and later crashed struct.pack in the alert trajectory (issue 13, item 6)."""
    got = parse({**GOOD, "seq": seq})
    assert isinstance(got, Rejected) and got.error == "wrong_type" and "2^53" in got.reason


def test_largest_seq_goes_through_the_alert_trajectory():
    from stream.core.trajectory import Final, Trajectory
    from stream.core.validate import MAX_SEQ

    u = parse({**GOOD, "seq": MAX_SEQ})
    assert isinstance(u, UtteranceMessage) and u.seq == MAX_SEQ
    t = Trajectory().append(Final(u.seq, u.role, u.speaker, "anger", 0.9))  # 2^63 raised struct.error here
    assert [f.seq for f in t.finals()] == [MAX_SEQ]
