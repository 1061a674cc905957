"""Replay recorded dialogues onto the `utterances` topic, as a live producer would.

Input formats, chosen by file extension (and, for .json, by content):
- .jsonl / .json: one message per line in the topic's own format (utterances and `end` control
  messages, e.g. stream/samples/call_center.jsonl); lines are sent as they are, in file order. A
  line may carry a gold `label` (the project's labelled JSONL, model/schemas): it is kept for
  `--score` and not sent;
- .json holding one EmoryNLP document (episodes -> scenes -> utterances): each scene becomes
  conversation `emorynlp-<scene_id>` with seq 0.. and an `end` message (gold label: `emotion`);
- .csv: a MELD split (Utterance, Speaker, Dialogue_ID, Utterance_ID, StartTime, ...); each dialogue
  becomes conversation `meld-<Dialogue_ID>` with seq 0.. in Utterance_ID order and an `end` message
  (gold label: `Emotion`).

`ts` is stamped at send time (not taken from the file), so ts_emitted - ts_produced in the events is
the monitor's real end-to-end latency.

With `--score` the replay also reads `emotions` while it sends and reports delivery, accuracy
against the gold labels and latency at the end (stream/tools/scoring.py).
"""

from __future__ import annotations

import asyncio
import csv
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from model.dialogue import json_objects
from stream import kafka
from stream.settings import Settings
from stream.tools.scoring import SentUtterance

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "call_center.jsonl"
MAX_GAP_S = 5.0  # long pauses (scene changes in MELD, hold music) would only make a demo drag
WORDS_PER_S = 2.5  # ~150 words/min, a usual speaking rate: the pace of a JSONL file without timings
MELD_COLUMNS = ("Utterance", "Speaker", "Dialogue_ID", "Utterance_ID", "StartTime")
_HINT = ("pass a .jsonl file in the `utterances` format (e.g. stream/samples/call_center.jsonl), "
         "a MELD CSV or an EmoryNLP JSON")


@dataclass(frozen=True)
class ReplayStats:
    sent: int
    conversations: int
    seconds: float
    sent_utterances: tuple[SentUtterance, ...] = field(default=(), repr=False)  # with ts and gold label


def load_messages(path: str | Path) -> list[dict]:
    """The messages `replay` would send, in send order (without `ts`)."""
    return [m for _, m in _load_timed(Path(path))]


def load_gold(path: str | Path) -> dict[tuple[str, int], str]:
    """(conversation_id, seq) -> gold label, for the utterances of the file that carry one."""
    return {(m["conversation_id"], m["seq"]): label for _, m, label in _load_labelled(Path(path)) if label is not None}


def _load_timed(path: Path) -> list[tuple[float, dict]]:
    """(seconds to wait before sending at real-time speed, message) pairs."""
    return [(gap, msg) for gap, msg, _ in _load_labelled(path)]


def _load_labelled(path: Path) -> list[tuple[float, dict, str | None]]:
    """(seconds to wait at real-time speed, message, gold label or None) triples."""
    if not path.is_file():
        raise FileNotFoundError(f"replay file not found: {path} ({_HINT})")
    suffix = path.suffix.lower()
    if suffix == ".json":
        doc = _whole_json(path)
        if isinstance(doc, dict) and "episodes" in doc:
            return _load_emorynlp(path, doc)
    if suffix in (".jsonl", ".json"):
        return _load_jsonl(path)
    if suffix == ".csv":
        return _load_meld(path)
    raise ValueError(f"unknown replay format {suffix or '(no extension)'!r} for {path}: {_HINT}")


def _whole_json(path: Path):
    """The file as one JSON document, or None (a JSONL file with several lines is not one)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (ValueError, UnicodeDecodeError):
        return None


def _load_emorynlp(path: Path, doc: dict) -> list[tuple[float, dict, str | None]]:
    """EmoryNLP JSON; conversation ids and speakers as model.training.data.load_emorynlp builds them."""
    out = []
    try:
        for ep in doc["episodes"]:
            for scene in ep["scenes"]:
                cid = f"emorynlp-{scene['scene_id']}"
                utts = scene["utterances"]
                for seq, u in enumerate(utts):
                    speakers = u.get("speakers") or []
                    speaker = speakers[0] if len(speakers) == 1 else " and ".join(speakers) or "unknown"
                    msg = {"conversation_id": cid, "seq": seq, "speaker": speaker, "role": None, "text": u["transcript"]}
                    out.append((_spoken_seconds(msg), msg, u.get("emotion") or None))
                if utts:
                    out.append((0.0, {"type": "end", "conversation_id": cid, "last_seq": len(utts) - 1}, None))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not an EmoryNLP document (episodes -> scenes -> utterances): missing {exc}") from None
    return out


def _load_jsonl(path: Path) -> list[tuple[float, dict, str | None]]:
    out = []
    for _, msg in json_objects(path):
        msg.pop("ts", None)  # stamped at send time
        label = msg.pop("label", None)  # gold, for --score: the monitor never sees it
        out.append((_spoken_seconds(msg), msg, label if isinstance(label, str) and label.strip() else None))
    return out


def _spoken_seconds(msg: dict) -> float:
    # The file has no timings: wait as long as saying the utterance takes, so a demo reads like a call.
    if msg.get("type", "utterance") != "utterance" or not isinstance(msg.get("text"), str):
        return 0.0
    return min(MAX_GAP_S, max(0.5, len(msg["text"].split()) / WORDS_PER_S))


def _load_meld(path: Path) -> list[tuple[float, dict, str | None]]:
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
                              "text": row["Utterance"]}, (row.get("Emotion") or "").strip().lower() or None))
        out.append((0.0, {"type": "end", "conversation_id": cid, "last_seq": len(rows) - 1}, None))
    return out


def _clock_seconds(value: str) -> float | None:
    """'HH:MM:SS,mmm' -> seconds; None when unparsable (then that utterance is not paced)."""
    m = re.fullmatch(r"\s*(\d+):(\d{1,2}):(\d{1,2})[,.](\d{1,3})\s*", value or "")
    if not m:
        return None
    h, mi, s, ms = m.groups()
    return int(h) * 3600 + int(mi) * 60 + int(s) + int(ms.ljust(3, "0")) / 1000


def _first_conversations(timed: list[tuple], limit: int) -> list[tuple]:
    """The items ((gap, message, ...) tuples) of the first `limit` conversations."""
    keep: set[str] = set()
    out = []
    for item in timed:
        cid = str(item[1].get("conversation_id"))
        if cid not in keep and len(keep) < limit:
            keep.add(cid)
        if cid in keep:
            out.append(item)
    return out


def _with_ends(items: list[tuple[float, dict, str | None]]) -> list[tuple[float, dict, str | None]]:
    """An `end` message right after the last line of every conversation that has none in the file
    (a labelled JSONL has none): without it its last L utterances wait for the idle timeout."""
    last: dict[str, int] = {}
    ended: set[str] = set()
    for i, (_, msg, _) in enumerate(items):
        cid = msg.get("conversation_id")
        if isinstance(cid, str):
            last[cid] = i
            if msg.get("type") == "end":
                ended.add(cid)
    closes = {i: cid for cid, i in last.items() if cid not in ended}
    out = []
    for i, item in enumerate(items):
        out.append(item)
        if i in closes:
            out.append((0.0, {"type": "end", "conversation_id": closes[i]}, None))
    return out


def _replay_items(path: str | Path, limit: int | None, close_conversations: bool) -> list[tuple[float, dict, str | None]]:
    items = _load_labelled(Path(path))
    if limit is not None:
        items = _first_conversations(items, limit)
    return _with_ends(items) if close_conversations else items


def _is_utterance(msg: dict) -> bool:
    return msg.get("type", "utterance") == "utterance" and isinstance(msg.get("conversation_id"), str) \
        and isinstance(msg.get("seq"), int)


async def replay(path: str | Path, bootstrap: str, topic: str = "utterances", speed: float = 0.0,
                 progress: bool = True, limit: int | None = None, settings: Settings | None = None,
                 tag: str | None = None, close_conversations: bool = False,
                 before_send: Callable[[dict], Awaitable[None]] | None = None) -> ReplayStats:
    """Send the file's messages to `topic`, key = conversation_id.

    speed: 0 sends as fast as possible; X replays at X times real time (pauses capped at 5 s).
    limit: replay only the first `limit` conversations, each whole with its `end` message, so a
    partial replay never leaves a conversation open.
    settings: where the Kafka security options come from (stream.kafka).
    tag: appended to every conversation id ("<id>-<tag>"), so a file can be replayed again against
    a stack that has seen (and ended) its conversations.
    close_conversations: send an `end` after the last line of each conversation the file leaves open.
    before_send: awaited before each message is sent (the scored replay's flow control).
    """
    from rich.console import Console
    from rich.progress import Progress

    if speed < 0:
        raise ValueError("speed must be >= 0 (0 = as fast as possible)")
    items = _replay_items(path, limit, close_conversations)
    producer = kafka.producer(
        bootstrap, settings, acks="all",
        linger_ms=5,  # small: at replay speed a message should leave at once, its ts is its send time
        value_serializer=lambda m: json.dumps(m, ensure_ascii=False).encode("utf-8"),
    )
    await producer.start()
    started = time.perf_counter()
    try:
        console = Console(stderr=True)  # stdout stays clean for whatever the caller prints
        with Progress(console=console, disable=not progress or not console.is_terminal, transient=True) as bar:
            task = bar.add_task(f"replay → {topic}", total=len(items))
            acks, sent = await _send_items(producer, topic, items, speed, tag, before_send, lambda: bar.advance(task))
            await asyncio.gather(*acks)  # raises if any message was not delivered
    finally:
        await producer.stop()
    return ReplayStats(sent=len(acks), conversations=len({m.get("conversation_id") for _, m, _ in items}),
                       seconds=time.perf_counter() - started, sent_utterances=tuple(sent))


async def _send_items(producer, topic: str, items, speed: float, tag: str | None, before_send, advance):
    """Queue every item (paced by `speed`, `ts` stamped at send); returns the ack futures and the
    utterances sent. send() only queues; aiokafka keeps one batch in flight per partition, so
    per-key order holds."""
    acks, sent = [], []
    for gap, msg, gold_label in items:
        if speed > 0 and gap > 0:
            await asyncio.sleep(gap / speed)
        if tag and isinstance(msg.get("conversation_id"), str):
            msg = {**msg, "conversation_id": f"{msg['conversation_id']}-{tag}"}
        if before_send is not None:
            await before_send(msg)
        msg = {**msg, "ts": time.time()}
        cid = msg.get("conversation_id")
        key = cid.encode("utf-8") if isinstance(cid, str) else None  # a broken line still goes out (DLQ tests)
        acks.append(await producer.send(topic, msg, key=key))
        if _is_utterance(msg):
            sent.append(SentUtterance(cid, msg["seq"], msg["ts"], gold_label))
        advance()
    return acks, sent


class _Answers:
    """What came back on `emotions` for the utterances a scored replay sent, and the flow control
    that keeps at most `max_in_flight` of them unanswered."""

    def __init__(self, max_in_flight: int, on_final: Callable[[], None], on_event: Callable[[dict], None] | None):
        self.max_in_flight, self.on_final, self.on_event = max_in_flight, on_final, on_event
        self.received: list[tuple[float, dict]] = []
        self.answered: set[tuple[str, int]] = set()  # utterances with a provisional (or any) event back
        self.finals: set[tuple[str, int]] = set()
        self.sent_keys: set[tuple[str, int]] = set()
        self.woke = asyncio.Event()

    async def gate(self, msg: dict) -> None:
        """Before an utterance goes out: wait (at most 5 s) while too many are unanswered."""
        if msg.get("type", "utterance") != "utterance" or not isinstance(msg.get("seq"), int):
            return
        self.sent_keys.add((msg.get("conversation_id"), msg["seq"]))
        give_up = time.monotonic() + 5.0
        while 0 < self.max_in_flight < len(self.sent_keys - self.answered) and time.monotonic() < give_up:
            self.woke.clear()
            try:
                await asyncio.wait_for(self.woke.wait(), timeout=max(0.01, give_up - time.monotonic()))
            except TimeoutError:
                break

    def take(self, records, now: float) -> None:
        for r in records:
            try:
                ev = json.loads(r.value)
            except (ValueError, TypeError):
                continue
            key = (ev.get("conversation_id"), ev.get("seq")) if isinstance(ev, dict) else None
            if key not in self.sent_keys:
                continue  # another run's conversation (the ts check in scoring does the rest)
            self.received.append((now, ev))
            self.answered.add(key)
            if ev.get("status") == "final" and key not in self.finals:
                self.finals.add(key)
                self.on_final()
            if self.on_event is not None:
                self.on_event(ev)

    async def read_until_done(self, consumer, sender: asyncio.Task, timeout_s: float) -> None:
        """Read until every sent utterance has its final, or `timeout_s` after the sender finished."""
        deadline = None
        while True:
            if sender.done():
                sender.result()  # raises a producer error at once
                deadline = deadline or time.monotonic() + timeout_s
                if self.finals >= self.sent_keys or time.monotonic() > deadline:
                    return
            batch = await consumer.getmany(timeout_ms=200)
            now = time.time()
            for records in batch.values():
                self.take(records, now)
            self.woke.set()


async def replay_scored(path: str | Path, bootstrap: str, utterances_topic: str = "utterances",
                        emotions_topic: str = "emotions", speed: float = 0.0, progress: bool = True,
                        limit: int | None = None, settings: Settings | None = None, tag: str | None = None,
                        max_in_flight: int = 64, timeout_s: float = 300.0, console=None,
                        on_event: Callable[[dict], None] | None = None) -> dict:
    """Replay `path` while reading `emotions_topic`; returns stream.tools.scoring's report.

    Reads `emotions` from the earliest offset (the local broker's "latest" offsets are wrong) and
    keeps only this replay's events (matched on conversation, seq and the `ts` stamped here).
    max_in_flight: at most this many utterances sent without their provisional event yet (0 = no
    limit), so the latency measures the monitor, not a queue the replay built in front of it;
    a missing answer holds the sender at most 5 s.
    Stops once every utterance has a final event, or `timeout_s` after the last message was sent.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from stream.tools.scoring import score_replay

    total = sum(1 for _, m, _ in _replay_items(path, limit, False) if m.get("type", "utterance") == "utterance")
    consumer = kafka.consumer(emotions_topic, bootstrap=bootstrap, settings=settings, fetch_max_wait_ms=10)
    await consumer.start()
    console = console or Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, disable=not progress or not console.is_terminal) as bar:
            t_sent = bar.add_task(f"sent → {utterances_topic}", total=total)
            t_final = bar.add_task(f"finals ← {emotions_topic}", total=total)
            answers = _Answers(max_in_flight, lambda: bar.advance(t_final), on_event)

            async def gated(msg: dict) -> None:
                await answers.gate(msg)
                if msg.get("type", "utterance") == "utterance":
                    bar.advance(t_sent)

            sender = asyncio.create_task(replay(path, bootstrap, utterances_topic, speed=speed, progress=False, limit=limit,
                                                settings=settings, tag=tag, close_conversations=True, before_send=gated))
            try:
                await answers.read_until_done(consumer, sender, timeout_s)
            finally:
                if not sender.done():
                    sender.cancel()
            stats = sender.result()
    finally:
        await consumer.stop()
    report = score_replay(stats.sent_utterances, answers.received)
    report["seconds"] = round(stats.seconds, 2)
    return report


def add_replay(sub) -> None:
    """`emotion-monitor replay` (wired into stream/cli.py by its owner)."""
    p = sub.add_parser("replay", help="send recorded dialogues to the utterances topic (--score: and report accuracy and latency)",
                       description="Replay a JSONL file in the utterances format (default: the bundled call-center "
                       "sample), a MELD CSV or an EmoryNLP JSON onto Kafka, keyed by conversation id, with ts stamped at "
                       "send time. With --score it also reads the emotions topic while it sends and reports at the end: "
                       "utterances sent, finals received, lost, duplicate final ids, weighted-F1 and macro-F1 of the final "
                       "and provisional events against the file's gold labels (MELD Emotion, EmoryNLP emotion, JSONL "
                       "label), how often a provisional label changed before its final, and produce -> provisional / "
                       "final latency (p50, p99). Needs a running worker.")
    p.add_argument("path", nargs="?", type=Path, default=SAMPLE, help="a .jsonl file, a MELD .csv or an EmoryNLP .json (default: %(default)s)")
    p.add_argument("--bootstrap", default=None, help="host:port (default: from EMOTION_MONITOR_BROKERS)")
    p.add_argument("--topic", default=None, help="default: the utterances topic from the settings")
    p.add_argument("--speed", type=float, default=0.0, help="0 = as fast as possible; X = X times real time")
    p.add_argument("--limit", type=int, default=None, help="replay only the first N conversations")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--tag", default=None, help="append -TAG to every conversation id (to replay a file again on the same stack)")
    p.add_argument("--score", action="store_true", help="read the emotions topic while replaying and report accuracy and latency")
    p.add_argument("--json", action="store_true", help="with --score: print the report as one JSON object, the last line")
    p.add_argument("--max-in-flight", type=int, default=64,
                   help="with --score: utterances sent and not yet answered at most (0 = no limit; default %(default)s)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="with --score: stop waiting for finals this many seconds after the last message (default %(default)s)")
    p.set_defaults(func=run_replay)


def print_report(report: dict, as_json: bool) -> None:
    from stream.tools.scoring import format_report

    for line in format_report(report):
        print(line)
    if as_json:
        print(json.dumps(report))


def run_replay(args) -> int:
    from stream.settings import load_settings

    settings = load_settings()
    bootstrap = args.bootstrap or settings.brokers
    if args.score:
        report = asyncio.run(replay_scored(args.path, bootstrap, args.topic or settings.utterances_topic,
                                           settings.emotions_topic, speed=args.speed, progress=not args.no_progress,
                                           limit=args.limit, settings=settings,
                                           tag=args.tag, max_in_flight=args.max_in_flight, timeout_s=args.timeout))
        print_report(report, args.json)
        return 0 if report["lost"] == 0 else 1
    stats = asyncio.run(replay(args.path, bootstrap,
                               topic=args.topic or settings.utterances_topic, speed=args.speed,
                               progress=not args.no_progress, limit=args.limit,
                               settings=settings, tag=args.tag))
    print(f"sent {stats.sent} messages from {stats.conversations} conversations in {stats.seconds:.2f} s")
    return 0
