"""What every output record shares: deterministic ids, the model field, the JSON encoding.

Ids are derived from what identifies a record (model, conversation, seq, status, ...), never
drawn at random: a redelivered input re-emits the same ids, and consumers de-duplicate on them.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import numpy as np
import orjson


def stable_id(*parts: object) -> str:
    """32 hex characters of SHA-256 over the parts (None as ''), joined by the unit separator."""
    raw = "\x1f".join("" if p is None else str(p) for p in parts)
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def event_id(model_id: str, conversation_id: str, seq: int, status: str, horizon_seq: int | None = None) -> str:
    """Emotion event id. `horizon_seq` (the newest seq scored with) only for `revised` events: a
    label can be revised several times."""
    return stable_id(model_id, conversation_id, seq, status, horizon_seq)


def alert_id(model_id: str, conversation_id: str, rule: str, kind: str, seq_to: int) -> str:
    return stable_id(model_id, conversation_id, rule, kind, seq_to)


def summary_id(model_id: str, conversation_id: str) -> str:
    return stable_id(model_id, conversation_id, "summary")


def model_field(model_id: str) -> dict[str, str]:
    """"name@version" -> the `model` field of every event: {"name": ..., "version": ...}."""
    name, _, version = model_id.partition("@")
    return {"name": name, "version": version}


def model_id_of(model: dict[str, Any]) -> str:
    """The inverse of `model_field`."""
    return f"{model['name']}@{model['version']}"


def _numpy_scalar(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def dump_json(obj: Any) -> bytes:
    """Compact UTF-8 JSON (orjson): every record on the topics and every stored state header.
    Readers see what the standard library wrote before, but for the spelling of some floats
    (1e-05 is now 0.00001) and non-ASCII text in headers, now UTF-8 rather than \\u escapes."""
    return orjson.dumps(obj, default=_numpy_scalar)


def encode_record(obj: dict[str, Any]) -> bytes:
    """A record's value on the topics: compact UTF-8 JSON."""
    return dump_json(obj)


def dead_letter(error: str, reason: str, topic: str, partition: int, offset: int, key: bytes | None,
                value: bytes | None, now: float, max_bytes: int) -> dict[str, Any]:
    """The dead letter of a message (stream/schemas/dlq.schema.json): the original bytes up to
    `max_bytes` (a prefix beyond that: a 1 MB message must not make a record the producer or broker
    refuses), with the original size and SHA-256 so the message can still be identified."""
    raw = value or b""
    return {
        "reason": reason,
        "error": error,
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "key_b64": base64.b64encode(key[:max_bytes]).decode() if key is not None else None,
        "key_truncated": key is not None and len(key) > max_bytes,
        "value_b64": base64.b64encode(raw[:max_bytes]).decode(),
        "value_truncated": len(raw) > max_bytes,
        "value_size": len(raw),
        "value_sha256": hashlib.sha256(raw).hexdigest(),
        "ts_received": now,
    }


def without_bytes(letter: dict[str, Any]) -> dict[str, Any]:
    """A dead letter the broker refused for its size, again without the original bytes (the size
    and hash stay)."""
    return {**letter, "key_b64": None, "key_truncated": letter.get("key_b64") is not None or letter.get("key_truncated", False),
            "value_b64": "", "value_truncated": True,
            "reason": letter["reason"] + " (the dead letter was too large for the broker: bytes left out)"}


def has_bytes(letter: dict[str, Any]) -> bool:
    return letter.get("value_b64") != "" or bool(letter.get("key_b64"))
