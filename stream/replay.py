"""Replay recorded dialogues onto the `utterances` topic, as a live producer would.

Two input formats, chosen by file extension:
- .jsonl / .json: one message per line in the topic's own format (utterances and `end` control
  messages, e.g. stream/samples/call_center.jsonl); lines are sent as they are, in file order;
- .csv: a MELD split (Utterance, Speaker, Dialogue_ID, Utterance_ID, StartTime, ...); each dialogue
  becomes conversation `meld-<Dialogue_ID>` with seq 0.. in Utterance_ID order and an `end` message.

`ts` is stamped at send time (not taken from the file), so ts_emitted - ts_produced in the events is
the monitor's real end-to-end latency.
"""

from __future__ import annotations

import asyncio
import csv
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

SAMPLE = Path(__file__).resolve().parent / "samples" / "call_center.jsonl"
MAX_GAP_S = 5.0  # long pauses (scene changes in MELD, hold music) would only make a demo drag
WORDS_PER_S = 2.5  # ~150 words/min, a usual speaking rate: the pace of a JSONL file without timings
MELD_COLUMNS = ("Utterance", "Speaker", "Dialogue_ID", "Utterance_ID", "StartTime")
_HINT = "pass a .jsonl file in the `utterances` format (e.g. stream/samples/call_center.jsonl) or a MELD CSV"


@dataclass(frozen=True)
class ReplayStats:
    sent: int
    conversations: int
    seconds: float


def load_messages(path: str | Path) -> list[dict]:
    """The messages `replay` would send, in send order (without `ts`)."""
    return [m for _, m in _load_timed(Path(path))]


def _load_timed(path: Path) -> list[tuple[float, dict]]:
    """(seconds to wait before sending at real-time speed, message) pairs."""
    if not path.is_file():
        raise FileNotFoundError(f"replay file not found: {path} ({_HINT})")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _load_jsonl(path)
    if suffix == ".csv":
        return _load_meld(path)
    raise ValueError(f"unknown replay format {suffix or '(no extension)'!r} for {path}: {_HINT}")


def _load_jsonl(path: Path) -> list[tuple[float, dict]]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                msg = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not JSON ({exc.msg}); expected one JSON object per line") from None
            if not isinstance(msg, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(msg).__name__}")
            msg.pop("ts", None)  # stamped at send time
            out.append((_spoken_seconds(msg), msg))
    return out


def _spoken_seconds(msg: dict) -> float:
    # The file has no timings: wait as long as saying the utterance takes, so a demo reads like a call.
    if msg.get("type", "utterance") != "utterance" or not isinstance(msg.get("text"), str):
        return 0.0
    return min(MAX_GAP_S, max(0.5, len(msg["text"].split()) / WORDS_PER_S))


def _load_meld(path: Path) -> list[tuple[float, dict]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in MELD_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: not a MELD CSV, missing column(s) {', '.join(missing)} ({_HINT})")
        dialogues: dict[int, list[dict]] = {}
        for row in reader:
            dialogues.setdefault(int(row["Dialogue_ID"]), []).append(row)
    out = []
    for did in sorted(dialogues):
        cid = f"meld-{did}"
        rows = sorted(dialogues[did], key=lambda r: int(r["Utterance_ID"]))  # ids may have gaps: seq renumbers
        prev = None
        for seq, row in enumerate(rows):
            start = _clock_seconds(row["StartTime"])
            # first utterance of a dialogue goes right away: dialogues are replayed back to back
            gap = 0.0 if prev is None or start is None else min(MAX_GAP_S, max(0.0, start - prev))
            prev = start if start is not None else prev
            out.append((gap, {"conversation_id": cid, "seq": seq, "speaker": row["Speaker"], "role": None,
                              "text": row["Utterance"]}))
        out.append((0.0, {"type": "end", "conversation_id": cid, "last_seq": len(rows) - 1}))
    return out


def _clock_seconds(value: str) -> float | None:
    """'HH:MM:SS,mmm' -> seconds; None when unparsable (then that utterance is not paced)."""
    m = re.fullmatch(r"\s*(\d+):(\d{1,2}):(\d{1,2})[,.](\d{1,3})\s*", value or "")
    if not m:
        return None
    h, mi, s, ms = m.groups()
    return int(h) * 3600 + int(mi) * 60 + int(s) + int(ms.ljust(3, "0")) / 1000


def _first_conversations(timed: list[tuple[float, dict]], limit: int) -> list[tuple[float, dict]]:
    keep: set[str] = set()
    out = []
    for gap, msg in timed:
        cid = str(msg.get("conversation_id"))
        if cid not in keep and len(keep) < limit:
            keep.add(cid)
        if cid in keep:
            out.append((gap, msg))
    return out


async def replay(path: str | Path, bootstrap: str, topic: str = "utterances", speed: float = 0.0,
                 progress: bool = True, limit: int | None = None, client_options: dict | None = None) -> ReplayStats:
    """Send the file's messages to `topic`, key = conversation_id.

    speed: 0 sends as fast as possible; X replays at X times real time (pauses capped at 5 s).
    limit: replay only the first `limit` conversations, each whole with its `end` message, so a
    partial replay never leaves a conversation open.
    client_options: aiokafka security arguments (`Settings.kafka_client_options()`).
    """
    from aiokafka import AIOKafkaProducer
    from rich.console import Console
    from rich.progress import Progress

    if speed < 0:
        raise ValueError("speed must be >= 0 (0 = as fast as possible)")
    timed = _load_timed(Path(path))
    if limit is not None:
        timed = _first_conversations(timed, limit)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap.replace("kafka://", ""),
        enable_idempotence=False,  # Tansu (local stack) lacks InitProducerId v0: idempotence fails there
        acks="all",
        linger_ms=5,  # small: at replay speed a message should leave at once, its ts is its send time
        value_serializer=lambda m: json.dumps(m, ensure_ascii=False).encode("utf-8"),
        **(client_options or {}),
    )
    await producer.start()
    sent, pending, started = 0, [], time.perf_counter()
    try:
        console = Console(stderr=True)  # stdout stays clean for whatever the caller prints
        with Progress(console=console, disable=not progress or not console.is_terminal, transient=True) as bar:
            task = bar.add_task(f"replay → {topic}", total=len(timed))
            for gap, msg in timed:
                if speed > 0 and gap > 0:
                    await asyncio.sleep(gap / speed)
                msg = {**msg, "ts": time.time()}
                cid = msg.get("conversation_id")
                key = cid.encode("utf-8") if isinstance(cid, str) else None  # a broken line still goes out (DLQ tests)
                # send() only queues; aiokafka keeps one batch in flight per partition, so per-key order holds
                pending.append(await producer.send(topic, msg, key=key))
                sent += 1
                bar.advance(task)
            await asyncio.gather(*pending)  # raises if any message was not delivered
    finally:
        await producer.stop()
    return ReplayStats(sent=sent, conversations=len({m.get("conversation_id") for _, m in timed}),
                       seconds=time.perf_counter() - started)


def add_replay(sub) -> None:
    """`emotion-monitor replay` (wired into stream/cli.py by its owner)."""
    p = sub.add_parser("replay", help="send recorded dialogues to the utterances topic",
                       description="Replay a JSONL file in the utterances format (default: the bundled call-center "
                       "sample) or a MELD CSV onto Kafka, keyed by conversation id, with ts stamped at send time.")
    p.add_argument("path", nargs="?", type=Path, default=SAMPLE, help="a .jsonl file or a MELD .csv (default: %(default)s)")
    p.add_argument("--bootstrap", default=None, help="host:port (default: from EMOTION_MONITOR_BROKERS)")
    p.add_argument("--topic", default=None, help="default: the utterances topic from the settings")
    p.add_argument("--speed", type=float, default=0.0, help="0 = as fast as possible; X = X times real time")
    p.add_argument("--limit", type=int, default=None, help="replay only the first N conversations")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_replay)


def run_replay(args) -> int:
    from stream.settings import load_settings

    settings = load_settings()
    stats = asyncio.run(replay(args.path, args.bootstrap or settings.bootstrap_servers(),
                               topic=args.topic or settings.utterances_topic, speed=args.speed,
                               progress=not args.no_progress, limit=args.limit,
                               client_options=settings.kafka_client_options()))
    print(f"sent {stats.sent} messages from {stats.conversations} conversations in {stats.seconds:.2f} s")
    return 0
