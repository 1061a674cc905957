"""Conversation state bytes (stream.core.codec) and the state store's kept states: the stored
format does not change, and a worker does not decode again the bytes it wrote itself."""

from __future__ import annotations

import asyncio
import base64
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from stream.core.codec import decode_state, encode_state
from stream.core.conversation import ConversationState, UttMeta
from stream.worker import state_store
from stream.worker.state_store import StateStore

FIXTURE = Path(__file__).parent / "data" / "state_before_issue15.b64"


def _fixture() -> bytes:
    """A state written by the codec as it was before issue 15 (tiny model, window 4: 40 utterances
    with the default alert rules, two of them raised, and seqs 42 and 43 held for a missing 40)."""
    return base64.b64decode(FIXTURE.read_text())


def test_a_state_written_before_still_loads_and_is_written_back_byte_for_byte():
    old = _fixture()
    state = decode_state(old)
    assert (state.version, state.partition, state.last_seq, state.dialogue.seen) == (7, 2, 39, 40)
    assert sorted(state.held) == [42, 43] and sorted(state.awaiting_final) == [38, 39]
    assert [a.rule for a in state.monitor.alerts] == ["customer_negative_streak", "customer_negative_streak_critical"]
    assert len(state.monitor.trajectory) == 38 and state.dialogue.vectors.shape == (4, 32)
    assert encode_state(state) == old  # the stored format is unchanged (old and new workers read each other's)


def test_decoded_model_arrays_are_read_only_views_of_the_stored_bytes():
    old = _fixture()
    state = decode_state(old)
    assert not state.dialogue.vectors.flags.writeable and not state.dialogue.vectors.flags.owndata


def _store(redis_url: str, **kw) -> StateStore:
    return StateStore(aioredis.from_url(redis_url), ttl_s=600, prefix=f"em:test-{uuid.uuid4().hex[:8]}", **kw)


def _open(last_seq: int, ts: float = 100.0) -> ConversationState:
    return ConversationState(last_seq=last_seq, last_event_ts=ts, awaiting_final={0: UttMeta(last_seq, "s", None, None, ts)})


def test_kept_states_stay_within_their_byte_budget():
    store = _store("redis://127.0.0.1:1", known_bytes=15_000)  # never connects
    blob = _fixture()  # ~7 KB
    state = decode_state(blob)
    for cid in "abc":
        store._remember(cid, blob, state)
    assert list(store._known) == ["b", "c"] and store._known_bytes == 2 * len(blob)
    store._remember("big", blob * 3, state)  # larger than the whole budget: not kept
    assert "big" not in store._known and store._known_bytes == 2 * len(blob)


@pytest.mark.integration
def test_the_state_a_worker_wrote_is_not_decoded_again_but_anyone_elses_is(stack, monkeypatch):
    decoded = []

    def counting(data):
        decoded.append(data)
        return decode_state(data)

    monkeypatch.setattr(state_store, "decode_state", counting)

    async def go():
        mine, other = _store(stack.redis_url), None
        try:
            other = StateStore(aioredis.from_url(stack.redis_url), 600, prefix=mine.prefix)
            assert await mine.save({"c": replace(decode_state(_fixture()), version=0)}, {"c": 3}) == set()
            first = (await mine.load(["c"]))["c"]
            again = (await mine.load(["c"]))["c"]
            assert decoded == [] and first is again
            # what it holds is what decoding the stored bytes gives
            stored = await mine.r.get(mine._key("c"))
            assert encode_state(first) == stored and (first.version, first.partition) == (1, 3)
            assert decode_state(stored).dialogue.vectors.tolist() == first.dialogue.vectors.tolist()
            # another worker writes the conversation: its bytes are decoded
            theirs = (await other.load(["c"]))["c"]
            assert len(decoded) == 1
            assert await other.save({"c": replace(theirs, last_seq=40)}, {"c": 3}) == set()
            now = (await mine.load(["c"]))["c"]
            assert len(decoded) == 2 and now.last_seq == 40 and now.version == 2
            # a fenced write is not kept: the stored (newer) state is read
            assert await mine.save({"c": replace(first, last_seq=99)}, {"c": 3}) == {"c"}
            assert (await mine.load(["c"]))["c"].last_seq == 40
            # a state that is gone is gone (quarantined, expired), also from what is kept
            await mine.r.delete(mine._key("c"))
            assert (await mine.load(["c"]))["c"] is None and "c" not in mine._known
            assert await mine.save({"d": _open(0)}, {"d": 0}) == set()
            await mine.quarantine("d", "test")
            assert "d" not in mine._known and (await mine.load(["d"]))["d"] is None
        finally:
            await mine.r.aclose()
            if other is not None:
                await other.r.aclose()

    asyncio.run(go())


def test_a_rolling_upgrade_writes_states_the_workers_before_the_compact_format_read(stack):
    """EMOTION_MONITOR_STATE_FORMAT=1: the model part of every state written is in the first format
    (what workers before the compact one read: tests/model/test_streaming.py's old_from_bytes), and
    new workers still read it back as the same state."""
    from stream.settings import Settings
    from stream.worker.app import _state_store
    from tests.model.test_streaming import old_from_bytes

    assert _state_store(Settings(state_format=1)).state_format == 1 and _state_store(Settings()).state_format == 2

    async def go():
        store = _store(stack.redis_url, state_format=1)
        try:
            state = replace(decode_state(_fixture()), version=0)
            assert await store.save({"c": state}, {"c": 3}) == set()
            stored = await store.r.get(store._key("c"))
            model_part = stored[stored.index(b"\n") + 1:]
            assert model_part[8:9] == b"{"  # safetensors: header length, then its JSON
            was = old_from_bytes(model_part)
            d = state.dialogue
            assert (was["seen"], was["parties"], sorted(was["pending"])) == (d.seen, d.parties, sorted(d.pending))
            assert was["vectors"].tolist() == d.vectors.tolist() and was["fwd"].tolist() == d.fwd.tolist()
            back = decode_state(stored)
            assert back.dialogue.vectors.tolist() == d.vectors.tolist() and back.last_seq == state.last_seq
            # (safetensors orders its metadata keys differently from call to call: compare states, not bytes)
            again = decode_state(encode_state(back, model_format=1))
            assert again.dialogue.fwd.tolist() == d.fwd.tolist() and again.dialogue.pending.keys() == d.pending.keys()
        finally:
            await store.r.aclose()

    asyncio.run(go())


def test_headers_and_records_are_one_line_json_that_the_standard_library_reads():
    """dump_json (orjson) writes the state headers and every record: what json.loads (older
    workers, any consumer) reads back as the same values, numpy scalars included, never a raw newline
    (the first b"\\n" of a state ends its header)."""
    import json

    import numpy as np

    from stream.core.events import dump_json

    value = {"tiny": 1e-05, "f32": np.float32(0.5), "i64": np.int64(7), "text": "caf\u00e9\nline", "tuple": (1, 2), "none": None}
    out = dump_json(value)
    assert b"\n" not in out
    assert json.loads(out) == {"tiny": 1e-05, "f32": 0.5, "i64": 7, "text": "caf\u00e9\nline", "tuple": [1, 2], "none": None}
    with pytest.raises(TypeError):
        dump_json({"x": object()})
    data = encode_state(decode_state(_fixture()))
    header = data[: data.index(b"\n")]
    assert header.startswith(b'{"version":7,') and json.loads(header)["last_seq"] == 39
