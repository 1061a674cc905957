"""`emotion-monitor soak`: many concurrent conversations for minutes; is memory flat?

Starts the local stack and a worker (state TTL shortened so expiry shows within the run), keeps
`--conversations` conversations live (each ends after `--turns` utterances and a new one takes
its place), samples every `--every` seconds: worker RSS, Redis used memory, conversation keys in
Redis; after the load stops, waits for the TTL and samples again (idle conversations expire).
Prints the table and a summary; `--json` adds one JSON object as the last line.

`--faults` runs the reliability soak instead (docs/reliability.md): `--workers` worker processes,
calls with pauses of 0 to `--max-pause` seconds inside them (longer than the idle timeout: flushes),
a worker SIGKILLed (and a fresh one started) every `--kill-every` seconds, Redis restarted (AOF kept)
at `--redis-restart-at`, and an invalid message every `--invalid-every` utterances. At the end every
live call gets its end message, and the run reports utterances in, finals out, lost (a valid
utterance without a final), duplicate final ids (an utterance with more than one final event id)
and dead letters: those it injected, and any other (expected: none). Exit code 1 unless lost,
duplicate final ids and unexpected dead letters are all 0.
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

from stream import kafka
from stream.settings import Settings
from stream.tools.load import call_utterance, end_message, sample_texts, send


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
    f = p.add_argument_group("faults (--faults: the reliability soak)")
    f.add_argument("--faults", action="store_true", help="pauses, worker kills, a Redis restart, invalid messages")
    f.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    f.add_argument("--max-pause", type=float, default=90.0, help="longest pause inside a call, seconds (default 90)")
    f.add_argument("--pause-prob", type=float, default=0.1, help="chance of a pause after an utterance (default 0.1)")
    f.add_argument("--kill-every", type=float, default=120.0, help="SIGKILL a worker this often, seconds (0: never)")
    f.add_argument("--redis-restart-at", type=float, default=None, help="restart Redis this far into the load (default: half way; <0: never)")
    f.add_argument("--invalid-every", type=int, default=50, help="one invalid message per this many utterances (0: none)")
    f.add_argument("--drain", type=float, default=240.0, help="seconds to wait for the last finals after the load")
    p.set_defaults(func=run_soak)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_soak(args) -> int:
    if getattr(args, "faults", False):
        from stream.tools.soak_faults import soak_faults

        return asyncio.run(soak_faults(args))
    return asyncio.run(_soak(args))


class MemorySoak:
    """One memory soak: keeps `--conversations` calls live through one worker and samples memory.

    Conversations still open when the load stops are flushed after the idle timeout (which rewrites
    their state and restarts its TTL), ended after the abandonment timeout, and their tombstones
    expire after the TTL: the last sample shows what is left."""

    def __init__(self, args, settings: Settings, stack, worker, redis_client, console):
        self.args, self.settings, self.stack, self.worker = args, settings, stack, worker
        self.redis, self.console = redis_client, console
        self.samples: list[dict] = []
        self.sent = 0
        self.t0 = time.time()

    async def sample(self, phase: str) -> None:
        info = await self.redis.info("memory")
        keys = len([k async for k in self.redis.scan_iter(match=f"em:{self.settings.app_id}:conv:*", count=1000)])
        row = {"t_s": round(time.time() - self.t0, 1), "phase": phase,
               "worker_rss_mb": round(_rss_mb(self.worker.proc.pid), 1),
               "redis_used_mb": round(info["used_memory"] / 2**20, 2), "conversation_keys": keys}
        self.samples.append(row)
        self.console.print(f"[dim]soak[/] {row}")

    async def run_load(self, producer) -> None:
        """Random live calls get their next utterance at `--rate`; a call ends after `--turns`."""
        args, topic = self.args, self.settings.utterances_topic
        texts, live = sample_texts(), {}
        self.t0 = next_sample = time.time()
        while time.time() - self.t0 < args.duration:
            self.worker.check()
            while len(live) < args.conversations:
                live[f"soak-{uuid.uuid4().hex[:10]}"] = 0
            cid = random.choice(list(live))
            await send(producer, topic, call_utterance(cid, live[cid], random.choice(texts)))
            self.sent += 1
            live[cid] += 1
            if live[cid] >= args.turns:
                await send(producer, topic, end_message(cid))
                del live[cid]
            if time.time() >= next_sample:
                await self.sample("load")
                next_sample += args.every
            await asyncio.sleep(max(0.0, self.t0 + self.sent / args.rate - time.time()))
        await producer.flush()

    def result(self) -> dict:
        samples, args = self.samples, self.args
        load = [s for s in samples if s["phase"] == "load"]
        half = load[len(load) // 2:] or load
        end, after = samples[-2], samples[-1]
        freed_keys = max(1, end["conversation_keys"] - after["conversation_keys"])
        return {
            "utterances_sent": self.sent,
            "rate_utt_per_s": round(self.sent / args.duration, 1),
            "conversations_live": args.conversations,
            "worker_rss_mb_first": load[0]["worker_rss_mb"] if load else None,
            "worker_rss_mb_last": end["worker_rss_mb"],
            "worker_rss_mb_second_half_range": [min(s["worker_rss_mb"] for s in half), max(s["worker_rss_mb"] for s in half)],
            "redis_kb_per_live_conversation": round(1024 * (end["redis_used_mb"] - after["redis_used_mb"]) / freed_keys, 1),
            "conversation_keys_at_load_end": end["conversation_keys"],
            "conversation_keys_after_ttl": after["conversation_keys"],
            "samples": samples,
        }


async def _soak(args) -> int:
    import redis.asyncio as aioredis
    from rich.console import Console

    from stream.tools.localrun import LocalWorker, local_topics, local_worker_env, wait_until_ready
    from stream.tools.localstack import local_stack

    console = Console(stderr=True)
    settings = Settings()
    workdir = Path(tempfile.mkdtemp(prefix="emotion-monitor-soak-"))
    with local_stack(local_topics(settings), workdir=workdir) as stack:
        idle_s = max(2, args.ttl // 2)
        # The state must outlive the abandonment timeout (checked at start): end silent calls just before.
        worker = LocalWorker(local_worker_env(stack, state_ttl_s=args.ttl, idle_finalize_s=idle_s,
                                              abandon_after_s=max(idle_s + 1, args.ttl - 1)), workdir / "worker.log")
        redis_client = aioredis.from_url(stack.redis_url)
        producer = kafka.producer(stack.bootstrap, linger_ms=5)
        soak = MemorySoak(args, settings, stack, worker, redis_client, console)
        try:
            await wait_until_ready(stack.bootstrap, settings.utterances_topic, None, worker,
                                   emotions_topic=settings.emotions_topic)
            await producer.start()
            await soak.run_load(producer)
            await soak.sample("load-end")
            wait = idle_s + args.ttl + 10
            console.print(f"[dim]soak[/] load stopped; waiting {wait} s for idle conversations to be finalised and expire")
            await asyncio.sleep(wait)
            await soak.sample("after-ttl")
        finally:
            await producer.stop()
            await redis_client.aclose()
            worker.stop()
    _print_memory(soak.result(), args)
    return 0


def _print_memory(result: dict, args) -> None:
    print(f"{'t (s)':>7} {'phase':<10} {'worker RSS MB':>14} {'Redis MB':>9} {'conv keys':>10}")
    for s in result["samples"]:
        print(f"{s['t_s']:>7} {s['phase']:<10} {s['worker_rss_mb']:>14} {s['redis_used_mb']:>9} {s['conversation_keys']:>10}")
    print(f"soak: {result['utterances_sent']} utterances at {result['rate_utt_per_s']} utt/s, {args.conversations} live "
          f"conversations; worker RSS {result['worker_rss_mb_first']} -> {result['worker_rss_mb_last']} MB; Redis "
          f"~{result['redis_kb_per_live_conversation']} KB per conversation; keys {result['conversation_keys_at_load_end']} "
          f"-> {result['conversation_keys_after_ttl']} after the TTL")
    if args.json:
        print(json.dumps(result))
