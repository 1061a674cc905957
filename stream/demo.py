"""`emotion-monitor demo`: the whole pipeline on one machine, end to end.

Starts a local Tansu broker and redis-server, a worker process with the shipped MELD model,
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

from stream.replay import SAMPLE, load_messages, print_report, replay, replay_scored
from stream.settings import Settings
from stream.watch import format_event

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
    p.add_argument("--model", type=Path, default=None, help="artifact folder (default: the shipped MELD model)")
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
    from stream import kafka
    from stream.localrun import LocalWorker, local_worker_env, wait_until_ready
    from stream.localstack import local_stack

    console = Console(stderr=args.json)  # with --json stdout carries the report only at its end
    if args.speed is None:
        args.speed = 0.0 if args.score else 20.0
    messages = load_messages(args.file)
    expected = {(m["conversation_id"], m["seq"]) for m in messages if m.get("type", "utterance") == "utterance"}
    base = Settings()
    topics = {base.utterances_topic: base.partitions, base.emotions_topic: base.partitions, base.dlq_topic: 1}
    workdir = Path(tempfile.mkdtemp(prefix="emotion-monitor-demo-"))
    console.print(f"[bold]demo[/]: starting a local Kafka-protocol broker (Tansu) and redis-server (logs in {workdir})")
    topics |= {base.alerts_topic: base.partitions, base.summaries_topic: base.partitions}
    alerts: list[dict] = []
    with local_stack(topics, workdir=workdir) as stack:
        from stream.dashboard.server import DashboardServer

        board = DashboardServer(base.model_copy(update={"brokers": f"kafka://{stack.bootstrap}"}), port=args.dashboard_port)
        try:
            await board.start()
        except OSError:  # the default port is taken: any free one will do for a demo
            board = DashboardServer(base.model_copy(update={"brokers": f"kafka://{stack.bootstrap}"}), port=0)
            await board.start()
        console.print(f"[bold]demo[/]: live dashboard at [link]{board.url}[/link] (open it in a browser while the demo runs)")
        env = local_worker_env(stack, model_path=args.model)
        console.print(f"[bold]demo[/]: starting a worker with the model {env.get('EMOTION_MONITOR_MODEL_PATH', base.model_path)}")
        worker = LocalWorker(env, workdir / "worker.log")
        consumer = kafka.consumer(base.emotions_topic, base.alerts_topic, bootstrap=stack.bootstrap, fetch_max_wait_ms=10)
        await consumer.start()
        finals: dict[tuple[str, int], str] = {}
        latencies: list[float] = []
        deadline = time.time() + args.timeout
        try:
            with console.status("waiting for the worker (model load, consumer group join)..."):
                await wait_until_ready(stack.bootstrap, base.utterances_topic, consumer, worker, args.timeout)
            console.print(f"[bold]demo[/]: worker ready; replaying {len(expected)} utterances from {args.file.name} at speed {args.speed}")
            if args.score:
                report = await replay_scored(args.file, stack.bootstrap, base.utterances_topic, base.emotions_topic,
                                             speed=args.speed, max_in_flight=args.max_in_flight,
                                             timeout_s=max(10.0, deadline - time.time()), console=console)
                return _print_score(report, args.json)
            sender = asyncio.create_task(replay(args.file, stack.bootstrap, base.utterances_topic, speed=args.speed, progress=False))

            def on_event(event: dict) -> bool:
                if "alert_id" in event:
                    alerts.append(event)
                    console.print(f"[bold red]ALERT[/] {event['severity']:<8} {event['conversation_id']}: {event['reason']}")
                    return False
                key = (event["conversation_id"], event["seq"])
                if key not in expected:
                    return False
                if event["status"] == "provisional" and event.get("ts_produced"):
                    latencies.append((time.time() - event["ts_produced"]) * 1000.0)
                if event["status"] == "final":
                    finals.setdefault(key, event["event_id"])
                if not args.quiet:
                    console.print(format_event(event), soft_wrap=True)
                return False

            while len(finals) < len(expected) and time.time() < deadline:
                await _read(consumer, on_event, deadline, max_wait=0.5)
                worker.check()
            await sender
            if args.hold > 0:
                console.print(f"[bold]demo[/]: holding for {args.hold:.0f} s; dashboard at {board.url}")
                await asyncio.sleep(args.hold)
        finally:
            await consumer.stop()
            worker.stop()
            await board.stop()
    lost = len(expected - set(finals))
    raised = [a for a in alerts if a["kind"] == "raised"]
    print(f"demo: {len(raised)} alerts raised in {len({a['conversation_id'] for a in raised})} conversations")
    p50, p99 = (np.percentile(latencies, [50, 99]) if latencies else (float("nan"), float("nan")))
    print(f"demo: {len(expected)} utterances in, {len(finals)} final events out, {lost} lost, p50 {p50:.0f} ms, p99 {p99:.0f} ms")
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
