"""A conversation's trajectory: its last MAX_TRAJECTORY finals, packed.

The trajectory is the one part of a conversation's monitor state that grows with the
conversation (up to the cap; the summary then says `trajectory_truncated`). Packed column-wise
into immutable byte strings, a final costs the same to add, store and load at position 5 as at 500.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

MAX_TRAJECTORY = 500


@dataclass(frozen=True)
class Final:
    """One final as the monitor keeps it (no text)."""

    seq: int
    role: str | None
    speaker: str
    emotion: str
    score: float  # score of `emotion`

    def to_dict(self) -> dict[str, Any]:
        """A point of the summary's trajectory and peaks (the state stores the same)."""
        return {"seq": self.seq, "role": self.role, "speaker": self.speaker, "emotion": self.emotion, "score": self.score}


def _table_index(table: tuple, item) -> tuple[tuple, int]:
    try:
        return table, table.index(item)
    except ValueError:
        return table + (item,), len(table)


@dataclass(frozen=True)
class Trajectory:
    """The last MAX_TRAJECTORY finals, one column per field.

    A tuple of `Final`s cost a Python object per final to build, store and load on every
    utterance (the state grew to 100 KB of JSON and the step three times slower by position 250);
    packed, adding a final is a few byte-string copies and the state holds 16 bytes per final
    (about 22 in the JSON).
    """

    seqs: bytes = b""  # int64 little-endian, one per final
    scores: bytes = b""  # float32
    who_ids: bytes = b""  # uint16 index into `who_table`
    emotion_ids: bytes = b""  # uint16 index into `emotion_table`
    who_table: tuple[tuple[str | None, str], ...] = ()  # (role, speaker)
    emotion_table: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.seqs) // 8

    def append(self, f: Final, cap: int = MAX_TRAJECTORY) -> Trajectory:
        who_table, who = _table_index(self.who_table, (f.role, f.speaker))
        emotion_table, emo = _table_index(self.emotion_table, f.emotion)
        t = Trajectory(self.seqs + struct.pack("<q", f.seq), self.scores + struct.pack("<f", f.score),
                       self.who_ids + struct.pack("<H", who), self.emotion_ids + struct.pack("<H", emo),
                       who_table, emotion_table)
        if len(t) > cap:
            t = Trajectory(t.seqs[-8 * cap:], t.scores[-4 * cap:], t.who_ids[-2 * cap:], t.emotion_ids[-2 * cap:],
                           who_table, emotion_table)
        if len(who_table) + len(emotion_table) > 2 * cap:  # many one-off speakers: drop entries no final uses
            t = Trajectory.of(t.finals())
        return t

    @classmethod
    def of(cls, finals: Iterable[Final]) -> Trajectory:
        t = cls()
        for f in finals:
            t = t.append(f)
        return t

    def finals(self) -> list[Final]:
        n = len(self)
        seqs = struct.unpack(f"<{n}q", self.seqs)
        scores = struct.unpack(f"<{n}f", self.scores)
        whos = struct.unpack(f"<{n}H", self.who_ids)
        emos = struct.unpack(f"<{n}H", self.emotion_ids)
        # float32 storage: rounded to 5 places, like the scores in the emotion events
        return [Final(q, *self.who_table[w], self.emotion_table[e], round(sc, 5))
                for q, sc, w, e in zip(seqs, scores, whos, emos)]
