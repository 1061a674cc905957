"""Input validation: raw Kafka bytes -> `UtteranceMessage` | `EndMessage` | `Rejected` (never an exception).

Every rejection carries a machine code and a sentence saying what was wrong, and keeps the
original bytes: the worker sends it to the dead-letter topic.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class UtteranceMessage:
    """A valid utterance from the `utterances` topic (model.dialogue.Utterance is the training side's)."""

    conversation_id: str
    seq: int
    speaker: str
    role: str | None
    text: str
    ts: float | None  # producer time (unix seconds), for latency figures
    digest: str  # content hash: tells a redelivered message from a different one with the same seq


@dataclass(frozen=True)
class EndMessage:
    """A valid `{"type": "end"}` control message: the conversation is over."""

    conversation_id: str
    ts: float | None


@dataclass(frozen=True)
class Rejected:
    error: str  # machine code, see stream/schemas/dlq.schema.json
    reason: str  # for people


MAX_ID_CHARS = 128
# The largest seq: JSON consumers (JavaScript) hold integers exactly only up to 2^53 - 1, and the
# state packs seqs as signed 64-bit integers (core.trajectory): 2^63 used to crash it there.
MAX_SEQ = 2**53 - 1


def parse_message(
    value: bytes | None, key: bytes | None, max_message_bytes: int, max_text_chars: int
) -> UtteranceMessage | EndMessage | Rejected:
    """Raw Kafka bytes -> a message, or why not (the checks in the order a producer would fix them)."""
    obj = _json_object(value, max_message_bytes)
    if isinstance(obj, Rejected):
        return obj
    cid = _conversation_id(obj, key)
    if isinstance(cid, Rejected):
        return cid
    ts = obj.get("ts")
    if ts is not None and (isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts)):
        return Rejected("wrong_type", "'ts' must be a number (unix seconds) when present")
    ts = float(ts) if ts is not None else None
    kind = obj.get("type", "utterance")
    if kind == "end":
        return EndMessage(cid, ts)
    if kind != "utterance":
        # Not quoted: the producer's value could be anything up to the message size limit.
        return Rejected("wrong_type", "unknown message type: use 'utterance' (default) or 'end' in 'type'")
    return _parse_utterance(obj, cid, ts, max_text_chars)


def _json_object(value: bytes | None, max_message_bytes: int) -> dict | Rejected:
    if value is None:
        return Rejected("invalid_json", "empty message (null value); send one JSON object per utterance")
    if len(value) > max_message_bytes:
        return Rejected("message_too_large", f"message is {len(value)} bytes, the limit is {max_message_bytes}")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejected("not_utf8", f"message is not UTF-8 ({exc.reason} at byte {exc.start})")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return Rejected("invalid_json", f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
    if not isinstance(obj, dict):
        return Rejected("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _conversation_id(obj: dict, key: bytes | None) -> str | Rejected:
    cid = obj.get("conversation_id")
    if cid is None:
        return Rejected("missing_field", "missing field 'conversation_id'")
    if not isinstance(cid, str):
        return Rejected("wrong_type", f"'conversation_id' must be a string, got {type(cid).__name__}")
    if not cid or len(cid) > MAX_ID_CHARS or not cid.isprintable():
        return Rejected("bad_conversation_id", f"'conversation_id' must be 1-{MAX_ID_CHARS} printable characters")
    # Kafka orders messages per key: a conversation spread over several keys could be read
    # out of order by two workers at once, so the key must be the conversation id.
    if key is None:
        return Rejected("key_mismatch", "the message has no Kafka key; key it by conversation_id (ordering is per key)")
    if key != cid.encode("utf-8"):
        return Rejected("key_mismatch", "the Kafka key must be the conversation_id (ordering is per key)")
    return cid


def _parse_utterance(obj: dict, cid: str, ts: float | None, max_text_chars: int) -> UtteranceMessage | Rejected:
    for name in ("seq", "speaker", "text"):
        if name not in obj or obj[name] is None:
            return Rejected("missing_field", f"missing field {name!r}")
    seq, speaker, role, utt = obj["seq"], obj["speaker"], obj.get("role"), obj["text"]
    problem = _seq_problem(seq) or _speaker_problem(speaker, role) or _text_problem(utt, max_text_chars)
    if problem is not None:
        return problem
    try:  # a JSON "\ud800" escape decodes to a lone surrogate, which no UTF-8 consumer can take
        (speaker + (role or "") + utt).encode("utf-8")
    except UnicodeEncodeError:
        return Rejected("not_utf8", "a string holds a lone surrogate (an invalid \\uD800-\\uDFFF escape)")
    digest = hashlib.blake2b(f"{speaker}\x1f{role}\x1f{utt}".encode(), digest_size=8).hexdigest()
    return UtteranceMessage(cid, seq, speaker.strip(), role, utt, ts, digest)


def _seq_problem(seq) -> Rejected | None:
    if isinstance(seq, bool) or not isinstance(seq, int):
        return Rejected("wrong_type", f"'seq' must be an integer, got {type(seq).__name__}")
    if seq < 0:
        return Rejected("wrong_type", "'seq' must be >= 0")
    if seq > MAX_SEQ:
        return Rejected("wrong_type", f"'seq' must be at most 2^53 - 1 ({MAX_SEQ}); number utterances 0, 1, 2, ... per conversation")
    return None


def _speaker_problem(speaker, role) -> Rejected | None:
    if not isinstance(speaker, str) or not speaker.strip() or len(speaker) > MAX_ID_CHARS:
        return Rejected("wrong_type", f"'speaker' must be a non-empty string of at most {MAX_ID_CHARS} characters")
    if role is not None and (not isinstance(role, str) or len(role) > MAX_ID_CHARS):
        return Rejected("wrong_type", "'role' must be a short string when present")
    return None


def _text_problem(utt, max_text_chars: int) -> Rejected | None:
    if not isinstance(utt, str):
        return Rejected("wrong_type", f"'text' must be a string, got {type(utt).__name__}")
    if not utt.strip():
        return Rejected("empty_text", "'text' is empty")
    if len(utt) > max_text_chars:
        return Rejected("text_too_long", f"'text' has {len(utt)} characters, the limit is {max_text_chars}")
    return None
