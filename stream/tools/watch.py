"""Live view of the `emotions` topic for people: one coloured line per emotion event.

Strings from the topic are shown as plain text (never as rich markup) with control characters
removed, so an event cannot restyle or corrupt the operator's terminal. Transcript text is shown
only when the event carries it (the worker echoes text only when configured to).
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime

from rich.console import Console
from rich.text import Text

from stream import kafka
from stream.settings import Settings

# MELD and EmoryNLP labels; anything else is shown unstyled.
EMOTION_STYLES = {
    "anger": "bold red", "mad": "bold red",
    "disgust": "green4",
    "fear": "magenta", "scared": "magenta",
    "sadness": "blue", "sad": "blue",
    "surprise": "cyan",
    "joy": "bright_green", "joyful": "bright_green",
    "peaceful": "light_sky_blue1", "powerful": "gold1",
    "neutral": "grey70",
}
STATUS_STYLES = {"provisional": "dim", "revised": "yellow", "final": "bold"}


def _clean(value, width: int | None = None) -> str:
    s = "".join(ch for ch in str(value) if ch.isprintable())
    if width is not None and len(s) > width:
        s = s[: width - 1] + "…"
    return s


def format_event(event: dict) -> Text:
    """One line: time, conversation, seq, speaker (role), status, emotion, top score, latency[, text]."""
    status = str(event.get("status", "?"))
    emotion = str(event.get("emotion", "?"))
    emitted = event.get("ts_emitted")
    try:
        clock = datetime.fromtimestamp(float(emitted)).strftime("%H:%M:%S.%f")[:-3]
    except (TypeError, ValueError, OverflowError, OSError):
        clock = "--:--:--.---"
    try:
        top = f"{max(float(v) for v in event['scores'].values()):.2f}"
    except (KeyError, AttributeError, TypeError, ValueError):
        top = "  ? "
    try:
        latency = f"{(float(emitted) - float(event['ts_produced'])) * 1000:6.0f} ms"
    except (KeyError, TypeError, ValueError):
        latency = "        "  # the producer sent no ts
    who = _clean(event.get("speaker", "?"))
    if event.get("role"):
        who += f" ({_clean(event['role'])})"
    line = Text()
    line.append(f"{clock} ", style="dim")
    line.append(f"{_clean(event.get('conversation_id', '?'), 18):<18} ")
    line.append(f"{_clean(event.get('seq', '?')):>4} ")
    line.append(f"{_clean(who, 28):<28} ")
    line.append(f"{_clean(status, 11):<11} ", style=STATUS_STYLES.get(status, ""))
    emotion_style = EMOTION_STYLES.get(emotion.lower(), "")
    if status == "provisional":
        emotion_style = f"{emotion_style} dim".strip()  # provisional verdicts may still change
    line.append(f"{_clean(emotion, 10):<10} ", style=emotion_style)
    line.append(f"{top} {latency}")
    if isinstance(event.get("text"), str):
        line.append(f"  “{_clean(event['text'], 80)}”", style="italic")
    return line


async def watch(bootstrap: str, topic: str = "emotions", conversation: str | None = None, final_only: bool = False,
                group: str | None = None, max_events: int | None = None, timeout_s: float | None = None,
                console: Console | None = None, settings: Settings | None = None) -> list[dict]:
    """Print emotion events as they arrive; return the events shown (after the filters).

    Stops after `max_events` shown events, after `timeout_s` seconds, or when cancelled (Ctrl-C).
    Without `group` nothing is committed and every run starts from the beginning of the topic;
    with a group, a later run resumes where this one stopped.
    """
    console = console or Console()
    # From the earliest offset, with a short fetch wait (stream.kafka's defaults): a supervisor
    # also sees the calls already in progress.
    consumer = kafka.consumer(
        topic, bootstrap=bootstrap, settings=settings,
        group_id=group,
        enable_auto_commit=group is not None,
        session_timeout_ms=6000,  # Kafka's minimum by default; a group's first join takes about half of it
        heartbeat_interval_ms=500,
    )
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    events: list[dict] = []
    await consumer.start()
    try:
        console.print(Text(f"{'time':<13}{'conversation':<19}{'seq':>4} {'speaker (role)':<29}{'status':<12}"
                           f"{'emotion':<11}score latency", style="dim underline"), soft_wrap=True)
        while max_events is None or len(events) < max_events:
            wait_s = 1.0 if deadline is None else min(1.0, deadline - loop.time())
            if wait_s <= 0:
                break
            batches = await consumer.getmany(timeout_ms=int(wait_s * 1000))
            for tp, records in batches.items():
                for record in records:
                    event = _decode(record, console)
                    if event is None or (conversation and event.get("conversation_id") != conversation):
                        continue
                    if final_only and event.get("status") != "final":
                        continue
                    events.append(event)
                    console.print(format_event(event), soft_wrap=True)
                    if max_events is not None and len(events) >= max_events:
                        return events
    finally:
        await consumer.stop()
    return events


def _decode(record, console: Console) -> dict | None:
    try:
        event = json.loads(record.value)
    except (TypeError, ValueError):
        event = None
    if not isinstance(event, dict):
        console.print(Text(f"skipped a message that is not a JSON object ({record.topic}/{record.partition}@{record.offset})",
                           style="red"))
        return None
    return event


def add_watch(sub) -> None:
    """`emotion-monitor watch` (wired into stream/cli.py by its owner)."""
    p = sub.add_parser("watch", help="show emotion events live",
                       description="Follow the emotions topic from its beginning and print one coloured line per "
                       "event (provisional dim, revised yellow, final bold). Ctrl-C stops.")
    p.add_argument("--bootstrap", default=None, help="host:port (default: from EMOTION_MONITOR_BROKERS)")
    p.add_argument("--topic", default=None, help="default: the emotions topic from the settings")
    p.add_argument("--conversation", default=None, help="only this conversation id")
    p.add_argument("--final-only", action="store_true", help="only final events")
    p.add_argument("--group", default=None, help="consumer group: resume where the last run with it stopped")
    p.add_argument("--max-events", type=int, default=None, help="stop after N events")
    p.add_argument("--timeout", type=float, default=None, help="stop after this many seconds")
    p.set_defaults(func=run_watch)


def run_watch(args) -> int:
    from stream.settings import load_settings

    settings = load_settings()
    try:
        asyncio.run(watch(args.bootstrap or settings.brokers, topic=args.topic or settings.emotions_topic,
                          conversation=args.conversation, final_only=args.final_only, group=args.group,
                          max_events=args.max_events, timeout_s=args.timeout,
                          settings=settings))
    except KeyboardInterrupt:
        pass  # Ctrl-C is the normal way to stop watching
    return 0
