"""A worker process on the local stack, for `demo` and `bench` (tests have their own harness)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from stream import kafka
from stream.settings import Settings
from stream.tools.localstack import free_port


def local_worker_env(stack, **settings) -> dict[str, str]:
    env = {
        **os.environ,
        "EMOTION_MONITOR_BROKERS": f"kafka://{stack.bootstrap}",
        "EMOTION_MONITOR_REDIS_URL": stack.redis_url,
        "EMOTION_MONITOR_WEB_PORT": str(free_port()),
        # Short group timeouts: the first join on Tansu takes about half the session timeout.
        "EMOTION_MONITOR_SESSION_TIMEOUT_S": "4",
        "EMOTION_MONITOR_HEARTBEAT_INTERVAL_S": "0.5",
        "EMOTION_MONITOR_REBALANCE_TIMEOUT_S": "4",
        "EMOTION_MONITOR_LOG_LEVEL": "warning",
    }
    env.update({f"EMOTION_MONITOR_{k.upper()}": str(v) for k, v in settings.items() if v is not None})
    return env


def local_topics(settings: Settings) -> dict[str, int]:
    """The topics a local run creates: the monitor's, the dead letters in one partition."""
    return kafka.monitor_topics(settings) | {settings.dlq_topic: 1}


class LocalWorker:
    """A worker process (or another faust app of the project: `module`) in its own process group,
    logging to `log`."""

    def __init__(self, env: dict[str, str], log: Path, module: Sequence[str] = ("stream.cli", "worker")):
        self.log = log
        self.web_port = int(env["EMOTION_MONITOR_WEB_PORT"])
        self.proc = subprocess.Popen([sys.executable, "-m", *module], env=env,
                                     stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the worker exited with {self.proc.returncode}; see {self.log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


async def wait_until_ready(bootstrap: str, utterances_topic: str, consumer, worker: LocalWorker, timeout_s: float = 120,
                           emotions_topic: str = "emotions") -> None:
    """Ready = a warm-up utterance went all the way through (model loaded, partitions assigned).

    `consumer` is a started consumer of the emotions topic (events it reads here are dropped), or
    None: then a consumer of `emotions_topic` is opened for the wait alone.
    """
    if consumer is None:
        probe = kafka.consumer(emotions_topic, bootstrap=bootstrap, fetch_max_wait_ms=50)
        await probe.start()
        try:
            return await wait_until_ready(bootstrap, utterances_topic, probe, worker, timeout_s)
        finally:
            await probe.stop()
    cid = f"warmup-{uuid.uuid4().hex[:8]}"
    producer = kafka.producer(bootstrap)
    await producer.start()
    try:
        msg = {"conversation_id": cid, "seq": 0, "speaker": "warmup", "text": "Hello, is this thing on?", "ts": time.time()}
        await producer.send_and_wait(utterances_topic, json.dumps(msg).encode(), key=cid.encode())
    finally:
        await producer.stop()
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        worker.check()
        batch = await consumer.getmany(timeout_ms=500)
        for records in batch.values():
            if any(json.loads(r.value).get("conversation_id") == cid for r in records):
                return
    raise TimeoutError(f"the worker did not answer within {timeout_s:.0f} s; see {worker.log}")


async def wait_all_assigned(workers: list[LocalWorker], timeout_s: float = 180) -> None:
    """Until every worker's /readyz says it holds partitions: a warm-up utterance answered by one
    worker says nothing of a second one still joining the group (and its join would pause the load)."""
    import asyncio
    import urllib.request

    def ready(w: LocalWorker) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{w.web_port}/readyz", timeout=2) as r:
                return bool(json.loads(r.read()).get("ready"))
        except (OSError, ValueError):  # not listening yet, or 503 while it has no partitions
            return False

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        for w in workers:
            w.check()
        if all(await asyncio.gather(*(asyncio.to_thread(ready, w) for w in workers))):
            return
        await asyncio.sleep(0.5)
    raise TimeoutError(f"not every worker held partitions within {timeout_s:.0f} s; see {', '.join(str(w.log) for w in workers)}")
