"""A conversation as the model sees it: utterances (text, speaker, optional label) in order.

Shared by offline scoring (model.offline), the training package and tests; the worker keeps its
own rolling state (model.streaming) and never builds these.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Utterance:
    text: str
    speaker: str
    emotion: str | None = None


@dataclass(frozen=True)
class Dialogue:
    id: str
    utterances: tuple[Utterance, ...]

    def __len__(self) -> int:
        return len(self.utterances)


def party_ids(speakers: Iterable[str], num_parties: int) -> list[int]:
    """Order of first appearance of each speaker in the conversation, capped at num_parties - 1."""
    seen: dict[str, int] = {}
    out = []
    for s in speakers:
        if s not in seen:
            seen[s] = min(len(seen), num_parties - 1)
        out.append(seen[s])
    return out


def json_objects(path: str | Path, error: type[Exception] = ValueError) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each line of a JSON-lines file, blank lines skipped: the one
    reader of conversation files (training's JSONL datasets, `replay`'s files). A line that is not
    a JSON object raises `error` naming the file and the line."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{path}:{lineno}: not JSON ({exc.msg}); expected one JSON object per line") from None
            if not isinstance(obj, dict):
                raise error(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj
