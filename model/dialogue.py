"""A conversation as the model sees it: utterances (text, speaker, optional label) in order.

Shared by offline scoring (model.offline), the training package and tests; the worker keeps its
own rolling state (model.streaming) and never builds these.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


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
