"""`emotion-monitor soak --faults`: the reliability soak (docs/reliability.md).

Worker processes, calls with pauses, worker kills, a Redis restart and injected invalid messages,
then a count of what was lost (what each flag does: `emotion-monitor soak --help`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import signal
import tempfile
import time
import uuid
from pathlib import Path

from stream import kafka
from stream.settings import Settings
from stream.tools.load import call_utterance, end_message, sample_texts, send
from stream.tools.localrun import LocalWorker, local_topics, local_worker_env, wait_all_assigned, wait_until_ready
from stream.tools.localstack import start_redis, start_stack, stop_process


def invalid_message(n: int) -> tuple[bytes, bytes]:
    """An invalid message of one of a few kinds (a key of its own, so no call's seq is touched)."""
    key = f"soak-invalid-{n}".encode()
    kinds = [b"{not json " + str(n).encode(),
             json.dumps({"conversation_id": key.decode(), "seq": 0, "speaker": "x"}).encode(),  # no text
             json.dumps({"conversation_id": key.decode(), "seq": -n, "speaker": "x", "text": "hi"}).encode()]
    return key, kinds[n % len(kinds)]


class FaultSoak:
    """One reliability soak: the stack, the workers, the calls, the faults and what came back."""

    def __init__(self, args, settings: Settings, workdir: Path, log):
        self.args, self.settings, self.workdir, self.log = args, settings, workdir, log
        self.rng = random.Random(13)
        self.texts = sample_texts()
        self.tag = uuid.uuid4().hex[:6]
        self.stack = start_stack(local_topics(settings), workdir=workdir, redis_appendonly=True)  # AOF: a restart keeps the state
        self.redis_proc = self.stack.redis_proc
        self.workers: list[LocalWorker] = []
        self.n_started = 0
        self.counts = {"worker_kills": 0, "redis_restarts": 0, "pauses": 0, "longest_pause_s": 0.0, "invalid_sent": 0}
        self.finals: dict[tuple[str, int], set[str]] = {}
        self.dlq: list[dict] = []
        self.sent: set[tuple[str, int]] = set()
        self.injected: set[bytes] = set()
        self.live: dict[str, list] = {}  # cid -> [next seq, due time]

    # ---- processes ---------------------------------------------------------------------------
    def start_worker(self) -> None:
        self.n_started += 1
        self.workers.append(LocalWorker(local_worker_env(self.stack), self.workdir / f"worker-{self.n_started}.log"))

    def replace_dead_workers(self) -> None:
        for w in [w for w in self.workers if w.proc.poll() is not None]:  # died on its own: a finding
            self.log(f"a worker exited by itself ({w.proc.returncode}); see {w.log}")
            self.workers.remove(w)
            self.start_worker()

    def kill_a_worker(self) -> None:
        victim = self.rng.choice(self.workers)
        os.killpg(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait(10)
        self.workers.remove(victim)
        self.start_worker()
        self.counts["worker_kills"] += 1
        self.log(f"SIGKILLed a worker ({self.counts['worker_kills']}), started another")

    async def restart_redis(self) -> None:
        stop_process(self.redis_proc)
        await asyncio.sleep(2.0)
        self.redis_proc, _ = start_redis(self.stack.workdir, appendonly=True, port=self.stack.redis_port)
        self.counts["redis_restarts"] += 1
        self.log("restarted Redis (down 2 s, AOF kept)")

    def stop(self) -> None:
        for w in self.workers:
            w.stop()
        stop_process(self.redis_proc)
        self.stack.stop()

    # ---- traffic -----------------------------------------------------------------------------
    async def read(self, consumer) -> None:
        """Collect this run's finals and every dead letter, until cancelled."""
        while True:
            batch = await consumer.getmany(timeout_ms=500)
            for tp, records in batch.items():
                for r in records:
                    v = json.loads(r.value)
                    if tp.topic == self.settings.dlq_topic:
                        self.dlq.append(v)
                    elif v.get("status") == "final" and v["conversation_id"].startswith(f"soak-{self.tag}"):
                        self.finals.setdefault((v["conversation_id"], v["seq"]), set()).add(v["event_id"])

    async def send_next(self, producer) -> bool:
        """The next utterance of a call that is due (False when none is): it may end the call, or
        start a pause; every `--invalid-every` utterances an invalid message follows."""
        args, topic = self.args, self.settings.utterances_topic
        while len(self.live) < args.conversations:
            self.live[f"soak-{self.tag}-{uuid.uuid4().hex[:8]}"] = [0, time.time()]
        due = [c for c, (_, at) in self.live.items() if at <= time.time()]
        if not due:
            return False
        cid = self.rng.choice(due)
        seq = self.live[cid][0]
        await send(producer, topic, call_utterance(cid, seq, self.rng.choice(self.texts)))
        self.sent.add((cid, seq))
        self.live[cid][0] = seq + 1
        if self.live[cid][0] >= args.turns:
            await send(producer, topic, end_message(cid))
            del self.live[cid]
        else:
            self.live[cid][1] = time.time() + self._pause()
        if args.invalid_every and len(self.sent) % args.invalid_every == 0:
            key, value = invalid_message(len(self.sent))
            await producer.send(topic, value, key=key)
            self.injected.add(value)
            self.counts["invalid_sent"] += 1
        return True

    def _pause(self) -> float:
        if self.rng.random() >= self.args.pause_prob:
            return 0.0
        pause = self.rng.uniform(0, self.args.max_pause)
        self.counts["pauses"] += 1
        self.counts["longest_pause_s"] = max(self.counts["longest_pause_s"], round(pause, 1))
        return pause

    async def run_load(self, producer) -> None:
        """Calls at `--rate` for `--duration` seconds, with the faults on their schedule; then every
        live call ends."""
        args = self.args
        t0 = time.time()
        restart_at = args.duration / 2 if args.redis_restart_at is None else args.redis_restart_at
        next_kill = t0 + args.kill_every if args.kill_every > 0 else float("inf")
        while time.time() - t0 < args.duration:
            self.replace_dead_workers()
            if time.time() >= next_kill:
                self.kill_a_worker()
                next_kill += args.kill_every
            if 0 <= restart_at <= time.time() - t0 and self.counts["redis_restarts"] == 0:
                await self.restart_redis()
            if not await self.send_next(producer):
                await asyncio.sleep(0.05)
                continue
            await asyncio.sleep(max(0.0, t0 + len(self.sent) / args.rate - time.time()))
        for cid in self.live:
            await send(producer, self.settings.utterances_topic, end_message(cid))
        await producer.flush()

    async def drain(self) -> None:
        """Wait (up to `--drain` s) for a final per utterance and a dead letter per injected message."""
        self.log(f"load stopped after {len(self.sent)} utterances; waiting up to {self.args.drain:.0f} s for the last finals")
        deadline = time.time() + self.args.drain
        while time.time() < deadline and (self.sent - self.finals.keys() or len(self.dlq) < self.counts["invalid_sent"]):
            await asyncio.sleep(1.0)
        await asyncio.sleep(2.0)  # late duplicates, if any, show up

    # ---- report ------------------------------------------------------------------------------
    def result(self) -> dict:
        def was_injected(r: dict) -> bool:
            return base64.b64decode(r.get("value_b64") or "") in self.injected

        injected = [r for r in self.dlq if was_injected(r)]
        unexpected = [r for r in self.dlq if not was_injected(r)]
        return {
            "utterances_in": len(self.sent),
            "finals_out": sum(len(v) for k, v in self.finals.items() if k in self.sent),
            "utterances_with_a_final": len(self.sent & self.finals.keys()),
            "lost": len(self.sent - self.finals.keys()),
            "duplicate_final_ids": sum(1 for v in self.finals.values() if len(v) > 1),
            "dlq_injected_sent": self.counts["invalid_sent"],
            # distinct injected messages dead-lettered; a batch redelivered after a kill dead-letters again
            # (at-least-once, like the events): records >= messages
            "dlq_injected_seen": len({r["value_b64"] for r in injected}),
            "dlq_injected_records": len(injected),
            "dlq_unexpected": len(unexpected),
            "dlq_unexpected_errors": sorted({r["error"] for r in unexpected}),
            **self.counts,
            "duration_s": self.args.duration,
            "workdir": str(self.workdir),
        }


async def soak_faults(args) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    settings = Settings()
    workdir = Path(tempfile.mkdtemp(prefix="emotion-monitor-soak-faults-"))
    soak = FaultSoak(args, settings, workdir, lambda msg: console.print(f"[dim]soak[/] {msg}"))
    consumer = kafka.consumer(settings.emotions_topic, settings.dlq_topic, bootstrap=soak.stack.bootstrap)
    producer = kafka.producer(soak.stack.bootstrap, linger_ms=5)
    reader = None
    try:
        for _ in range(max(1, args.workers)):
            soak.start_worker()
        await consumer.start()
        await wait_until_ready(soak.stack.bootstrap, settings.utterances_topic, consumer, soak.workers[0])
        await wait_all_assigned(soak.workers)
        reader = asyncio.create_task(soak.read(consumer))
        await producer.start()
        soak.log(f"{len(soak.workers)} worker(s) ready; load for {args.duration:.0f} s")
        await soak.run_load(producer)
        await soak.drain()
    finally:
        if reader is not None:
            reader.cancel()
        await producer.stop()
        await consumer.stop()
        soak.stop()
    return _report(soak.result(), args.json)


def _report(result: dict, as_json: bool) -> int:
    print(f"soak --faults: {result['utterances_in']} utterances in, {result['finals_out']} finals out, {result['lost']} lost, "
          f"{result['duplicate_final_ids']} duplicate final ids; DLQ {result['dlq_injected_seen']}/{result['dlq_injected_sent']} "
          f"injected, {result['dlq_unexpected']} other; {result['worker_kills']} worker kills, {result['redis_restarts']} Redis "
          f"restart(s), {result['pauses']} pauses (longest {result['longest_pause_s']} s)")
    if as_json:
        print(json.dumps(result))
    ok = result["lost"] == 0 and result["duplicate_final_ids"] == 0 and result["dlq_unexpected"] == 0 \
        and result["dlq_injected_seen"] == result["dlq_injected_sent"]
    return 0 if ok else 1
