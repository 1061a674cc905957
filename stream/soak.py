"""`emotion-monitor soak`: many concurrent conversations for minutes; is memory flat?

Starts the local stack and a worker (state TTL shortened so expiry shows within the run), keeps
`--conversations` conversations live (each ends after `--turns` utterances and a new one takes
its place), samples every `--every` seconds: worker RSS, Redis used memory, conversation keys in
Redis; after the load stops, waits for the TTL and samples again (idle conversations expire).
Prints the table and a summary; `--json` adds one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
import uuid
from pathlib import Path

from stream.settings import Settings


def add_soak(sub) -> None:
    p = sub.add_parser("soak", help="replay many concurrent conversations for minutes and watch memory",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=180.0, help="seconds of load (default 180)")
    p.add_argument("--conversations", type=int, default=200, help="conversations live at once (default 200)")
    p.add_argument("--rate", type=float, default=60.0, help="utterances per second (default 60)")
    p.add_argument("--turns", type=int, default=12, help="utterances per conversation (default 12)")
    p.add_argument("--ttl", type=int, default=20, help="state TTL in seconds for this run (default 20)")
    p.add_argument("--every", type=float, default=10.0, help="sampling interval in seconds")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_soak)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_soak(args) -> int:
    return asyncio.run(_soak(args))


async def _soak(args) -> int:
    import redis.asyncio as aioredis
    from aiokafka import AIOKafkaProducer
    from rich.console import Console

    from stream.bench import _texts
    from stream.localrun import LocalWorker, local_worker_env, wait_until_ready
    from stream.localstack import local_stack

    console = Console(stderr=True)
    settings = Settings()
    texts = _texts()
    workdir = Path(tempfile.mkdtemp(prefix="emotion-monitor-soak-"))
    topics = {t: settings.partitions for t in (settings.utterances_topic, settings.emotions_topic, settings.alerts_topic,
                                                settings.summaries_topic)} | {settings.dlq_topic: 1}
    samples: list[dict] = []
    with local_stack(topics, workdir=workdir) as stack:
        idle_s = max(2, args.ttl // 2)
        worker = LocalWorker(local_worker_env(stack, state_ttl_s=args.ttl, idle_finalize_s=idle_s), workdir / "worker.log")
        r = aioredis.from_url(stack.redis_url)
        producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap, enable_idempotence=False, linger_ms=5)
        from aiokafka import AIOKafkaConsumer

        probe = AIOKafkaConsumer(settings.emotions_topic, bootstrap_servers=stack.bootstrap, group_id=None,
                                 auto_offset_reset="earliest", fetch_max_wait_ms=50)
        await probe.start()
        try:
            await wait_until_ready(stack.bootstrap, settings.utterances_topic, probe, worker)
        finally:
            await probe.stop()
        await producer.start()

        async def sample(phase: str, t0: float) -> None:
            info = await r.info("memory")
            keys = len([k async for k in r.scan_iter(match=f"em:{settings.app_id}:conv:*", count=1000)])
            row = {"t_s": round(time.time() - t0, 1), "phase": phase, "worker_rss_mb": round(_rss_mb(worker.proc.pid), 1),
                   "redis_used_mb": round(info["used_memory"] / 2**20, 2), "conversation_keys": keys}
            samples.append(row)
            console.print(f"[dim]soak[/] {row}")

        live: dict[str, int] = {}
        sent, t0 = 0, time.time()
        next_sample = t0
        try:
            while time.time() - t0 < args.duration:
                worker.check()
                while len(live) < args.conversations:
                    live[f"soak-{uuid.uuid4().hex[:10]}"] = 0
                cid = random.choice(list(live))
                seq = live[cid]
                msg = {"conversation_id": cid, "seq": seq, "speaker": f"{cid}-{seq % 2}",
                       "role": "customer" if seq % 2 == 0 else "agent", "text": random.choice(texts), "ts": time.time()}
                await producer.send(settings.utterances_topic, json.dumps(msg).encode(), key=cid.encode())
                sent += 1
                live[cid] = seq + 1
                if live[cid] >= args.turns:
                    end = {"type": "end", "conversation_id": cid}
                    await producer.send(settings.utterances_topic, json.dumps(end).encode(), key=cid.encode())
                    del live[cid]
                if time.time() >= next_sample:
                    await sample("load", t0)
                    next_sample += args.every
                await asyncio.sleep(max(0.0, t0 + sent / args.rate - time.time()))
            await producer.flush()
            await sample("load-end", t0)
            # Conversations still open at the end are finalised after idle_s (which rewrites their
            # state, restarting its TTL), then expire after the TTL.
            wait = idle_s + args.ttl + 10
            console.print(f"[dim]soak[/] load stopped; waiting {wait} s for idle conversations to be finalised and expire")
            await asyncio.sleep(wait)
            await sample("after-ttl", t0)
        finally:
            await producer.stop()
            await r.aclose()
            worker.stop()
    load = [s for s in samples if s["phase"] == "load"]
    half = load[len(load) // 2:] or load
    result = {
        "utterances_sent": sent,
        "rate_utt_per_s": round(sent / args.duration, 1),
        "conversations_live": args.conversations,
        "worker_rss_mb_first": load[0]["worker_rss_mb"] if load else None,
        "worker_rss_mb_last": samples[-2]["worker_rss_mb"],
        "worker_rss_mb_second_half_range": [min(s["worker_rss_mb"] for s in half), max(s["worker_rss_mb"] for s in half)],
        "redis_kb_per_live_conversation": round(
            1024 * (samples[-2]["redis_used_mb"] - samples[-1]["redis_used_mb"]) / max(1, samples[-2]["conversation_keys"] - samples[-1]["conversation_keys"]), 1),
        "conversation_keys_at_load_end": samples[-2]["conversation_keys"],
        "conversation_keys_after_ttl": samples[-1]["conversation_keys"],
        "samples": samples,
    }
    print(f"{'t (s)':>7} {'phase':<10} {'worker RSS MB':>14} {'Redis MB':>9} {'conv keys':>10}")
    for s in samples:
        print(f"{s['t_s']:>7} {s['phase']:<10} {s['worker_rss_mb']:>14} {s['redis_used_mb']:>9} {s['conversation_keys']:>10}")
    print(f"soak: {sent} utterances at {result['rate_utt_per_s']} utt/s, {args.conversations} live conversations; worker RSS "
          f"{result['worker_rss_mb_first']} -> {result['worker_rss_mb_last']} MB; Redis ~{result['redis_kb_per_live_conversation']} KB "
          f"per conversation; keys {result['conversation_keys_at_load_end']} -> {result['conversation_keys_after_ttl']} after the TTL")
    if args.json:
        print(json.dumps(result))
    return 0
