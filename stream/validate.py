"""Input validation: raw Kafka bytes -> `Utterance` | `End` | `Rejected` (never an exception).

Every rejection carries a machine code and a sentence saying what was wrong, and keeps the
original bytes: the worker sends it to the dead-letter topic.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Utterance:
    conversation_id: str
    seq: int
    speaker: str
    role: str | None
    text: str
    ts: float | None  # producer time (unix seconds), for latency figures
    digest: str  # content hash: tells a redelivered message from a different one with the same seq


@dataclass(frozen=True)
class End:
    conversation_id: str
    ts: float | None
    reason: str = "end"  # "end" (control message) or "idle" (timeout)


@dataclass(frozen=True)
class Rejected:
    error: str  # machine code, see stream/schemas/dlq.schema.json
    reason: str  # for people


MAX_ID_CHARS = 128
# The largest seq: JSON consumers (JavaScript) hold integers exactly only up to 2^53 - 1, and the
# state packs seqs as signed 64-bit integers (alerts.Trajectory): 2^63 used to crash it there.
MAX_SEQ = 2**53 - 1


def _bad(error: str, reason: str) -> Rejected:
    return Rejected(error, reason)


def parse_message(
    value: bytes | None, key: bytes | None, max_message_bytes: int, max_text_chars: int
) -> Utterance | End | Rejected:
    if value is None:
        return _bad("invalid_json", "empty message (null value); send one JSON object per utterance")
    if len(value) > max_message_bytes:
        return _bad("message_too_large", f"message is {len(value)} bytes, the limit is {max_message_bytes}")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _bad("not_utf8", f"message is not UTF-8 ({exc.reason} at byte {exc.start})")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return _bad("invalid_json", f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
    if not isinstance(obj, dict):
        return _bad("not_an_object", f"expected a JSON object, got {type(obj).__name__}")

    cid = obj.get("conversation_id")
    if cid is None:
        return _bad("missing_field", "missing field 'conversation_id'")
    if not isinstance(cid, str):
        return _bad("wrong_type", f"'conversation_id' must be a string, got {type(cid).__name__}")
    if not cid or len(cid) > MAX_ID_CHARS or not cid.isprintable():
        return _bad("bad_conversation_id", f"'conversation_id' must be 1-{MAX_ID_CHARS} printable characters")
    # Kafka orders messages per key: a conversation spread over several keys could be read
    # out of order by two workers at once, so the key must be the conversation id.
    if key is not None and key != cid.encode("utf-8"):
        return _bad("key_mismatch", "the Kafka key must be the conversation_id (ordering is per key)")
    if key is None:
        return _bad("key_mismatch", "the message has no Kafka key; key it by conversation_id (ordering is per key)")

    ts = obj.get("ts")
    if ts is not None and (isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts)):
        return _bad("wrong_type", "'ts' must be a number (unix seconds) when present")
    ts = float(ts) if ts is not None else None

    kind = obj.get("type", "utterance")
    if kind == "end":
        return End(cid, ts)
    if kind != "utterance":
        # Not quoted: the producer's value could be anything up to the message size limit.
        return _bad("wrong_type", "unknown message type: use 'utterance' (default) or 'end' in 'type'")

    for name in ("seq", "speaker", "text"):
        if name not in obj or obj[name] is None:
            return _bad("missing_field", f"missing field {name!r}")
    seq = obj["seq"]
    if isinstance(seq, bool) or not isinstance(seq, int):
        return _bad("wrong_type", f"'seq' must be an integer, got {type(seq).__name__}")
    if seq < 0:
        return _bad("wrong_type", "'seq' must be >= 0")
    if seq > MAX_SEQ:
        return _bad("wrong_type", f"'seq' must be at most 2^53 - 1 ({MAX_SEQ}); number utterances 0, 1, 2, ... per conversation")
    speaker = obj["speaker"]
    if not isinstance(speaker, str) or not speaker.strip() or len(speaker) > MAX_ID_CHARS:
        return _bad("wrong_type", f"'speaker' must be a non-empty string of at most {MAX_ID_CHARS} characters")
    role = obj.get("role")
    if role is not None and (not isinstance(role, str) or len(role) > MAX_ID_CHARS):
        return _bad("wrong_type", "'role' must be a short string when present")
    utt = obj["text"]
    if not isinstance(utt, str):
        return _bad("wrong_type", f"'text' must be a string, got {type(utt).__name__}")
    if not utt.strip():
        return _bad("empty_text", "'text' is empty")
    if len(utt) > max_text_chars:
        return _bad("text_too_long", f"'text' has {len(utt)} characters, the limit is {max_text_chars}")
    try:  # a JSON "\ud800" escape decodes to a lone surrogate, which no UTF-8 consumer can take
        (speaker + (role or "") + utt).encode("utf-8")
    except UnicodeEncodeError:
        return _bad("not_utf8", "a string holds a lone surrogate (an invalid \\uD800-\\uDFFF escape)")
    digest = hashlib.blake2b(f"{speaker}\x1f{role}\x1f{utt}".encode(), digest_size=8).hexdigest()
    return Utterance(cid, seq, speaker.strip(), role, utt, ts, digest)
