"""The message contracts as JSON Schema (draft 2020-12), shipped in stream/schemas/.

The schema files are the single written contract between producers, the worker and subscribers;
the README documents the same fields. `jsonschema` is only needed to *validate* (tests, tools),
so it is imported lazily: the worker's hot path never depends on it.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib.resources import files
from typing import Any

# name -> file in stream/schemas/ (package data, so it works from an installed wheel too)
SCHEMAS = {
    "utterance": "utterance.schema.json",
    "control": "control.schema.json",
    "emotion-event": "emotion-event.schema.json",
    "dlq": "dlq.schema.json",
    "alert": "alert.schema.json",
    "summary": "summary.schema.json",
}


def load_schema(name: str) -> dict:
    """The schema document called `name` (one of SCHEMAS), as a dict."""
    try:
        filename = SCHEMAS[name]
    except KeyError:
        raise ValueError(f"unknown schema {name!r}; known: {', '.join(SCHEMAS)}") from None
    return json.loads(files("stream").joinpath("schemas", filename).read_text(encoding="utf-8"))


@lru_cache(maxsize=None)
def _validator(name: str):
    try:
        import jsonschema
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "validating messages needs the 'jsonschema' package: pip install jsonschema "
            "(it is a dev dependency: pip install -e '.[dev]')"
        ) from exc
    schema = load_schema(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def input_schema_name(message: Any) -> str:
    """Which schema a message on `utterances` follows: "control" for {"type": "end"}, else "utterance"."""
    return "control" if isinstance(message, dict) and message.get("type") == "end" else "utterance"


def validate_event(obj: Any, name: str) -> None:
    """Raise jsonschema.ValidationError (the most relevant error) unless `obj` follows schema `name`.

    `name` is a key of SCHEMAS, or "input" to pick utterance/control from the message itself.
    """
    if name == "input":
        name = input_schema_name(obj)
    validator = _validator(name)
    import jsonschema

    error = jsonschema.exceptions.best_match(validator.iter_errors(obj))
    if error is not None:
        raise error
