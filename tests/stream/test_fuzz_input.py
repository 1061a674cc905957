"""Property-based fuzzing of the input path: whatever arrives, the result is a value, never an exception."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream.core.validate import EndMessage, Rejected, UtteranceMessage, parse_message

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text()
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
fields = st.fixed_dictionaries(
    {},
    optional={
        "conversation_id": st.text(max_size=140) | json_values,
        "seq": st.integers(min_value=-3, max_value=2**40) | json_values,
        "speaker": st.text(max_size=140) | json_values,
        "role": st.none() | st.text(max_size=140) | json_values,
        "text": st.text(max_size=300) | json_values,
        "ts": st.floats(allow_nan=True, allow_infinity=True) | json_values,
        "type": st.sampled_from(["utterance", "end", "other"]) | json_values,
    },
)


def check(value: bytes, key: bytes | None):
    out = parse_message(value, key, max_message_bytes=4096, max_text_chars=200)
    assert isinstance(out, (UtteranceMessage, EndMessage, Rejected))
    if isinstance(out, Rejected):
        assert out.error and out.reason
    if isinstance(out, UtteranceMessage):
        assert out.text.strip() and len(out.text) <= 200 and out.seq >= 0 and key == out.conversation_id.encode()
        out.text.encode("utf-8")  # never a lone surrogate downstream
    return out


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600), st.none() | st.binary(max_size=20))
def test_random_bytes_never_raise(value, key):
    check(value, key)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(fields)
def test_random_json_objects_never_raise(obj):
    raw = json.dumps(obj, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass")
    cid = obj.get("conversation_id")
    key = cid.encode("utf-8", "surrogatepass") if isinstance(cid, str) else b"k"
    check(raw, key)


@pytest.mark.parametrize("text", ["\u200b", "\U0001F600 sure!", "e\u0301", "\u202eevil", "\x00nul", "a" * 200, "\ufeffbom"])
def test_unicode_edge_cases(text):
    raw = json.dumps({"conversation_id": "c", "seq": 0, "speaker": "s", "text": text}).encode()
    out = check(raw, b"c")
    assert isinstance(out, (UtteranceMessage, Rejected))


def test_fuzz_counts_are_reported(capsys):
    """A fixed-seed batch of random messages, with the count per outcome printed (docs/reliability.md quotes it)."""
    import random

    rng = random.Random(1234)
    counts: Counter[str] = Counter()
    for _ in range(3000):
        kind = rng.random()
        if kind < 0.3:
            value = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80)))
        else:
            obj = {"conversation_id": rng.choice(["c1", "", 7, None, "x" * 200]), "seq": rng.choice([0, 3, -1, "1", True, 2.5]),
                   "speaker": rng.choice(["a", "", None, 5]), "text": rng.choice(["hi", "", "  ", None, "y" * 300, "\ud800"])}
            obj = {k: v for k, v in obj.items() if rng.random() > 0.1}
            value = json.dumps(obj).encode()
        out = check(value, b"c1")
        counts[out.error if isinstance(out, Rejected) else type(out).__name__] += 1
    print("fuzz outcomes:", dict(sorted(counts.items())))
    assert sum(counts.values()) == 3000 and counts["UtteranceMessage"] > 0 and len(counts) >= 6
