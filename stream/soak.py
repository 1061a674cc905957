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
        return asyncio.run(_soak_faults(args))
    return asyncio.run(_soak(args))


async def _soak(args) -> int:
    import redis.asyncio as aioredis
    from rich.console import Console

    from stream import kafka
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
        # The state must outlive the abandonment timeout (checked at start): end silent calls just before.
        worker = LocalWorker(local_worker_env(stack, state_ttl_s=args.ttl, idle_finalize_s=idle_s,
                                              abandon_after_s=max(idle_s + 1, args.ttl - 1)), workdir / "worker.log")
        r = aioredis.from_url(stack.redis_url)
        producer = kafka.producer(stack.bootstrap, linger_ms=5)
        probe = kafka.consumer(settings.emotions_topic, bootstrap=stack.bootstrap, fetch_max_wait_ms=50)
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


# ---- the reliability soak ------------------------------------------------------------------------

def _invalid(n: int) -> tuple[bytes, bytes]:
    """An invalid message of one of a few kinds (a key of its own, so no call's seq is touched)."""
    key = f"soak-invalid-{n}".encode()
    kinds = [b"{not json " + str(n).encode(),
             json.dumps({"conversation_id": key.decode(), "seq": 0, "speaker": "x"}).encode(),  # no text
             json.dumps({"conversation_id": key.decode(), "seq": -n, "speaker": "x", "text": "hi"}).encode()]
    return key, kinds[n % len(kinds)]


async def _soak_faults(args) -> int:
    import base64
    import os
    import signal

    from rich.console import Console

    from stream import kafka
    from stream.bench import _texts
    from stream.localrun import LocalWorker, local_worker_env, wait_all_assigned, wait_until_ready
    from stream.localstack import start_redis, start_stack, stop_process

    console = Console(stderr=True)
    settings = Settings()
    texts = _texts()
    rng = random.Random(13)
    workdir = Path(tempfile.mkdtemp(prefix="emotion-monitor-soak-faults-"))
    topics = {t: settings.partitions for t in (settings.utterances_topic, settings.emotions_topic, settings.alerts_topic,
                                                settings.summaries_topic)} | {settings.dlq_topic: 1}
    stack = start_stack(topics, workdir=workdir, redis_appendonly=True)  # AOF: a restart keeps the state
    redis_proc = stack.redis_proc
    workers: list[LocalWorker] = []
    counts = {"worker_kills": 0, "redis_restarts": 0, "pauses": 0, "longest_pause_s": 0.0, "invalid_sent": 0}
    finals: dict[tuple[str, int], set[str]] = {}
    dlq: list[dict] = []
    sent: set[tuple[str, int]] = set()
    injected: set[bytes] = set()
    tag = uuid.uuid4().hex[:6]
    n_started = 0

    def start_worker() -> LocalWorker:
        nonlocal n_started
        n_started += 1
        return LocalWorker(local_worker_env(stack), workdir / f"worker-{n_started}.log")

    async def read(consumer) -> None:
        while True:
            batch = await consumer.getmany(timeout_ms=500)
            for tp, records in batch.items():
                for r in records:
                    v = json.loads(r.value)
                    if tp.topic == settings.dlq_topic:
                        dlq.append(v)
                    elif v.get("status") == "final" and v["conversation_id"].startswith(f"soak-{tag}"):
                        finals.setdefault((v["conversation_id"], v["seq"]), set()).add(v["event_id"])

    log = lambda msg: console.print(f"[dim]soak[/] {msg}")  # noqa: E731
    consumer = kafka.consumer(settings.emotions_topic, settings.dlq_topic, bootstrap=stack.bootstrap)
    producer = kafka.producer(stack.bootstrap, linger_ms=5)
    reader = None
    try:
        workers = [start_worker() for _ in range(max(1, args.workers))]
        await consumer.start()
        await wait_until_ready(stack.bootstrap, settings.utterances_topic, consumer, workers[0])
        await wait_all_assigned(workers)
        reader = asyncio.create_task(read(consumer))
        await producer.start()
        log(f"{len(workers)} worker(s) ready; load for {args.duration:.0f} s")
        live: dict[str, list] = {}  # cid -> [next seq, due time]
        t0 = time.time()
        restart_at = args.duration / 2 if args.redis_restart_at is None else args.redis_restart_at
        next_kill = t0 + args.kill_every if args.kill_every > 0 else float("inf")
        n_sent = 0
        while time.time() - t0 < args.duration:
            now = time.time()
            for w in list(workers):
                if w.proc.poll() is not None:  # died on its own: a finding, but keep the load going
                    log(f"a worker exited by itself ({w.proc.returncode}); see {w.log}")
                    workers.remove(w)
                    workers.append(start_worker())
            if now >= next_kill:
                victim = rng.choice(workers)
                os.killpg(victim.proc.pid, signal.SIGKILL)
                victim.proc.wait(10)
                workers.remove(victim)
                workers.append(start_worker())
                counts["worker_kills"] += 1
                next_kill += args.kill_every
                log(f"SIGKILLed a worker ({counts['worker_kills']}), started another")
            if restart_at >= 0 and now - t0 >= restart_at and counts["redis_restarts"] == 0:
                stop_process(redis_proc)
                await asyncio.sleep(2.0)
                redis_proc, _ = start_redis(stack.workdir, appendonly=True, port=stack.redis_port)
                counts["redis_restarts"] += 1
                log("restarted Redis (down 2 s, AOF kept)")
            while len(live) < args.conversations:
                live[f"soak-{tag}-{uuid.uuid4().hex[:8]}"] = [0, time.time()]
            due = [c for c, (_, at) in live.items() if at <= time.time()]
            if not due:
                await asyncio.sleep(0.05)
                continue
            cid = rng.choice(due)
            seq = live[cid][0]
            msg = {"conversation_id": cid, "seq": seq, "speaker": f"{cid}-{seq % 2}",
                   "role": "customer" if seq % 2 == 0 else "agent", "text": rng.choice(texts), "ts": time.time()}
            await producer.send(settings.utterances_topic, json.dumps(msg).encode(), key=cid.encode())
            sent.add((cid, seq))
            n_sent += 1
            live[cid][0] = seq + 1
            if live[cid][0] >= args.turns:
                await producer.send(settings.utterances_topic, json.dumps({"type": "end", "conversation_id": cid}).encode(),
                                    key=cid.encode())
                del live[cid]
            elif rng.random() < args.pause_prob:
                pause = rng.uniform(0, args.max_pause)
                live[cid][1] = time.time() + pause
                counts["pauses"] += 1
                counts["longest_pause_s"] = max(counts["longest_pause_s"], round(pause, 1))
            else:
                live[cid][1] = time.time()
            if args.invalid_every and n_sent % args.invalid_every == 0:
                key, value = _invalid(n_sent)
                await producer.send(settings.utterances_topic, value, key=key)
                injected.add(value)
                counts["invalid_sent"] += 1
            await asyncio.sleep(max(0.0, t0 + n_sent / args.rate - time.time()))
        for cid in live:  # the load stops: every live call ends
            await producer.send(settings.utterances_topic, json.dumps({"type": "end", "conversation_id": cid}).encode(),
                                key=cid.encode())
        await producer.flush()
        log(f"load stopped after {n_sent} utterances; waiting up to {args.drain:.0f} s for the last finals")
        deadline = time.time() + args.drain
        while time.time() < deadline and (len(sent - finals.keys()) or len(dlq) < counts["invalid_sent"]):
            await asyncio.sleep(1.0)
        await asyncio.sleep(2.0)  # late duplicates, if any, show up
    finally:
        if reader is not None:
            reader.cancel()
        await producer.stop()
        await consumer.stop()
        for w in workers:
            w.stop()
        stop_process(redis_proc)
        stack.stop()
    got_injected = [r for r in dlq if base64.b64decode(r.get("value_b64") or "") in injected]
    unexpected = [r for r in dlq if base64.b64decode(r.get("value_b64") or "") not in injected]
    result = {
        "utterances_in": len(sent),
        "finals_out": sum(len(v) for k, v in finals.items() if k in sent),
        "utterances_with_a_final": len(sent & finals.keys()),
        "lost": len(sent - finals.keys()),
        "duplicate_final_ids": sum(1 for v in finals.values() if len(v) > 1),
        "dlq_injected_sent": counts["invalid_sent"],
        # distinct injected messages dead-lettered; a batch redelivered after a kill dead-letters again
        # (at-least-once, like the events): records >= messages
        "dlq_injected_seen": len({r["value_b64"] for r in got_injected}),
        "dlq_injected_records": len(got_injected),
        "dlq_unexpected": len(unexpected),
        "dlq_unexpected_errors": sorted({r["error"] for r in unexpected}),
        **counts,
        "duration_s": args.duration,
        "workdir": str(workdir),
    }
    print(f"soak --faults: {result['utterances_in']} utterances in, {result['finals_out']} finals out, {result['lost']} lost, "
          f"{result['duplicate_final_ids']} duplicate final ids; DLQ {result['dlq_injected_seen']}/{result['dlq_injected_sent']} "
          f"injected, {result['dlq_unexpected']} other; {counts['worker_kills']} worker kills, {counts['redis_restarts']} Redis "
          f"restart(s), {counts['pauses']} pauses (longest {counts['longest_pause_s']} s)")
    if args.json:
        print(json.dumps(result))
    ok = result["lost"] == 0 and result["duplicate_final_ids"] == 0 and result["dlq_unexpected"] == 0 \
        and result["dlq_injected_seen"] == result["dlq_injected_sent"]
    return 0 if ok else 1
