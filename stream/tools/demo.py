"""`emotion-monitor demo`: the whole pipeline on one machine, end to end.

Starts a local Tansu broker and redis-server, a worker process with the default MELD model,
replays the bundled call-center conversations, shows the events live, shuts everything down
and ends with one line:

    demo: N utterances in, N final events out, 0 lost, p50 X ms, p99 Y ms

Latency = time the demo's own consumer received the provisional event - `ts` stamped by the
replay at send time (same clock): produce -> event, through broker, worker, Redis and broker.

With --score (e.g. `emotion-monitor demo --file dev_sent_emo.csv --score --json`) it replays FILE
as fast as the worker takes it (at most --max-in-flight utterances unanswered) and reports what
`replay --score` reports: delivery, weighted/macro-F1 of the final and provisional events against
the file's gold labels, and latency; --json prints that report as one JSON object, the last line.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console

from stream import kafka
from stream.settings import Settings
from stream.tools.replay import SAMPLE, load_messages, print_report, replay, replay_scored
from stream.tools.watch import format_event


def add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline locally on the bundled sample and print a summary line",
        description=__doc__,
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter,
    )
    p.add_argument("--file", type=Path, default=SAMPLE, help="conversations to replay (.jsonl, MELD .csv or EmoryNLP .json)")
    p.add_argument("--speed", type=float, default=None,
                   help="replay speed (X times real time; 0 = all at once; default 20, with --score 0)")
    p.add_argument("--model", type=Path, default=None, help="artifact folder (default: model/weights/meld-mpnet, the default MELD model)")
    p.add_argument("--quiet", action="store_true", help="do not print every event")
    p.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds")
    p.add_argument("--dashboard-port", type=int, default=None,
                   help="port of the live dashboard during the demo (default: EMOTION_MONITOR_DASHBOARD_PORT, 8088; 0 = any free port)")
    p.add_argument("--hold", type=float, default=0.0, help="keep the stack and the dashboard up this many seconds after the replay")
    p.add_argument("--score", action="store_true",
                   help="report delivery, accuracy against the file's gold labels (MELD, EmoryNLP, labelled JSONL) and latency")
    p.add_argument("--json", action="store_true", help="with --score: print the report as one JSON object, the last line")
    p.add_argument("--max-in-flight", type=int, default=64,
                   help="with --score: utterances sent and not yet answered at most (0 = no limit; default %(default)s)")
    p.set_defaults(func=run_demo)


def run_demo(args) -> int:
    return asyncio.run(_demo(args))


async def _demo(args) -> int:
    from stream.tools.localrun import local_topics
    from stream.tools.localstack import local_stack

    console = Console(stderr=args.json)  # with --json stdout carries the report only at its end
    if args.speed is None:
        args.speed = 0.0 if args.score else 20.0
    base = Settings()
    workdir = Path(tempfile.mkdtemp(prefix="emotion-monitor-demo-"))
    console.print(f"[bold]demo[/]: starting a local Kafka-protocol broker (Tansu) and redis-server (logs in {workdir})")
    with local_stack(local_topics(base), workdir=workdir) as stack:
        board = await _start_dashboard(base, stack, args.dashboard_port)
        console.print(f"[bold]demo[/]: live dashboard at [link]{board.url}[/link] (open it in a browser while the demo runs)")
        try:
            return await _run_on_stack(args, base, stack, workdir, console, board)
        finally:
            await board.stop()


async def _start_dashboard(base: Settings, stack, port: int | None):
    from stream.dashboard.server import DashboardServer

    settings = base.model_copy(update={"brokers": f"kafka://{stack.bootstrap}"})
    board = DashboardServer(settings, port=port)
    try:
        await board.start()
    except OSError:  # the default port is taken: any free one will do for a demo
        board = DashboardServer(settings, port=0)
        await board.start()
    return board


async def _run_on_stack(args, base: Settings, stack, workdir: Path, console, board) -> int:
    """Start a worker, wait until it answers, then replay the file (scored, or shown live)."""
    from stream.tools.localrun import LocalWorker, local_worker_env, wait_until_ready

    env = local_worker_env(stack, model_path=args.model)
    console.print(f"[bold]demo[/]: starting a worker with the model {env.get('EMOTION_MONITOR_MODEL_PATH', base.model_path)}")
    worker = LocalWorker(env, workdir / "worker.log")
    consumer = kafka.consumer(base.emotions_topic, base.alerts_topic, bootstrap=stack.bootstrap, fetch_max_wait_ms=10)
    await consumer.start()
    deadline = time.time() + args.timeout
    try:
        with console.status("waiting for the worker (model load, consumer group join)..."):
            await wait_until_ready(stack.bootstrap, base.utterances_topic, consumer, worker, args.timeout)
        live = LiveDemo(args, console)
        console.print(f"[bold]demo[/]: worker ready; replaying {len(live.expected)} utterances from {args.file.name} "
                      f"at speed {args.speed}")
        if args.score:
            report = await replay_scored(args.file, stack.bootstrap, base.utterances_topic, base.emotions_topic,
                                         speed=args.speed, max_in_flight=args.max_in_flight,
                                         timeout_s=max(10.0, deadline - time.time()), console=console)
            return _print_score(report, args.json)
        await live.run(stack.bootstrap, base.utterances_topic, consumer, worker, deadline)
        if args.hold > 0:
            console.print(f"[bold]demo[/]: holding for {args.hold:.0f} s; dashboard at {board.url}")
            await asyncio.sleep(args.hold)
    finally:
        await consumer.stop()
        worker.stop()
    return live.summary()


class LiveDemo:
    """The replay shown live: every event as it arrives, alerts in red, then one summary line."""

    def __init__(self, args, console):
        self.args, self.console = args, console
        messages = load_messages(args.file)
        self.expected = {(m["conversation_id"], m["seq"]) for m in messages if m.get("type", "utterance") == "utterance"}
        self.finals: dict[tuple[str, int], str] = {}
        self.latencies: list[float] = []
        self.alerts: list[dict] = []

    async def run(self, bootstrap: str, topic: str, consumer, worker, deadline: float) -> None:
        sender = asyncio.create_task(replay(self.args.file, bootstrap, topic, speed=self.args.speed, progress=False))
        while len(self.finals) < len(self.expected) and time.time() < deadline:
            await _read(consumer, self.on_event, deadline, max_wait=0.5)
            worker.check()
        await sender

    def on_event(self, event: dict) -> bool:
        if "alert_id" in event:
            self.alerts.append(event)
            self.console.print(f"[bold red]ALERT[/] {event['severity']:<8} {event['conversation_id']}: {event['reason']}")
            return False
        key = (event["conversation_id"], event["seq"])
        if key not in self.expected:
            return False
        if event["status"] == "provisional" and event.get("ts_produced"):
            self.latencies.append((time.time() - event["ts_produced"]) * 1000.0)
        if event["status"] == "final":
            self.finals.setdefault(key, event["event_id"])
        if not self.args.quiet:
            self.console.print(format_event(event), soft_wrap=True)
        return False

    def summary(self) -> int:
        lost = len(self.expected - set(self.finals))
        raised = [a for a in self.alerts if a["kind"] == "raised"]
        print(f"demo: {len(raised)} alerts raised in {len({a['conversation_id'] for a in raised})} conversations")
        p50, p99 = (np.percentile(self.latencies, [50, 99]) if self.latencies else (float("nan"), float("nan")))
        print(f"demo: {len(self.expected)} utterances in, {len(self.finals)} final events out, {lost} lost, "
              f"p50 {p50:.0f} ms, p99 {p99:.0f} ms")
        return 0 if lost == 0 else 1


def _print_score(report: dict, as_json: bool) -> int:
    print(f"demo: scored {report['sent']} utterances in {report['seconds']:.1f} s")
    print_report(report, as_json)
    return 0 if report["lost"] == 0 else 1


async def _read(consumer, handle, deadline: float, max_wait: float = 1.0) -> bool:
    """Poll once; True when `handle` returned True for one of the events."""
    hit = False
    batch = await consumer.getmany(timeout_ms=int(max(0.05, min(max_wait, deadline - time.time())) * 1000))
    for records in batch.values():
        for r in records:
            try:
                event = json.loads(r.value)
            except ValueError:
                continue
            hit = handle(event) or hit
    if time.time() > deadline:
        raise TimeoutError("the demo ran past --timeout; see the worker log")
    return hit
