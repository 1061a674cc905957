"""Helpers for integration tests: a real worker process, a producer and an event collector."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from stream import kafka
from stream.tools.localrun import LocalWorker
from stream.tools.localstack import free_port


def worker_env(stack, model_path: Path, names: dict[str, str], **extra) -> dict[str, str]:
    env = {
        **os.environ,
        "EMOTION_MONITOR_BROKERS": f"kafka://{stack.bootstrap}",
        "EMOTION_MONITOR_REDIS_URL": stack.redis_url,
        "EMOTION_MONITOR_MODEL_PATH": str(model_path),
        "EMOTION_MONITOR_DEVICE": "cpu",
        "EMOTION_MONITOR_PARTITIONS": "3",
        # Short group timeouts: Tansu's first join takes about half the session timeout.
        "EMOTION_MONITOR_SESSION_TIMEOUT_S": "4",
        "EMOTION_MONITOR_HEARTBEAT_INTERVAL_S": "0.5",
        "EMOTION_MONITOR_REBALANCE_TIMEOUT_S": "4",
        "EMOTION_MONITOR_WEB_PORT": str(free_port()),
        "EMOTION_MONITOR_APP_ID": names["app_id"],
        "EMOTION_MONITOR_UTTERANCES_TOPIC": names["utterances"],
        "EMOTION_MONITOR_EMOTIONS_TOPIC": names["emotions"],
        "EMOTION_MONITOR_DLQ_TOPIC": names["dlq"],
        "EMOTION_MONITOR_ALERTS_TOPIC": names["alerts"],
        "EMOTION_MONITOR_SUMMARIES_TOPIC": names["summaries"],
        "EMOTION_MONITOR_LOG_LEVEL": "info",
    }
    env.update({f"EMOTION_MONITOR_{k.upper()}": str(v) for k, v in extra.items()})
    return env


def unique_names() -> dict[str, str]:
    tag = uuid.uuid4().hex[:8]
    return {"app_id": f"em-test-{tag}", "utterances": f"utt-{tag}", "emotions": f"emo-{tag}", "dlq": f"dlq-{tag}",
            "alerts": f"alerts-{tag}", "summaries": f"sum-{tag}"}


class WorkerProcess(LocalWorker):
    """The demo's worker launcher, plus what tests need: SIGKILL and the log's tail."""

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def tail(self, n: int = 40) -> str:
        """The log's last `n` lines under a line that says whether the process still runs (an empty
        log then reads as "still starting" or "killed", not as nothing)."""
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        rc = self.proc.poll()
        state = "running" if rc is None else f"exited with {rc}"
        return "\n".join([f"[worker pid {self.proc.pid} {state}; {self.log}: {len(lines)} lines]", *lines[-n:]])

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        """Until /readyz answers 200 (model loaded, Redis takes writes, partitions assigned). A slow
        start (a loaded machine: the first log line alone took 30 s and more) then no longer eats
        into a test's own time bound. Fails at once, with the log, if the process exits."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the worker exited before it was ready\n{self.tail()}")
            if readyz(self.web_port)[0] == 200:
                return
            time.sleep(0.3)
        raise AssertionError(f"the worker was not ready within {timeout_s:.0f} s (last /readyz: {readyz(self.web_port)})\n"
                             f"{self.tail()}")


def readyz(port: int) -> tuple[int, dict]:
    """The worker's /readyz: (status, body); (0, {}) while nothing listens."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except (OSError, ValueError):
        return 0, {}


def wait_for(pred, timeout_s: float) -> bool:
    """Poll `pred` every 0.3 s until it holds (True) or `timeout_s` passes (False)."""
    end = time.time() + timeout_s
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.3)
    return False


async def produce(bootstrap: str, topic: str, messages: list, pause_s: float = 0.0) -> None:
    """messages: dicts (sent as JSON, keyed by conversation_id) or (key, raw bytes) tuples."""
    p = kafka.producer(bootstrap)
    await p.start()
    try:
        for m in messages:
            if isinstance(m, tuple):
                key, value = m
            else:
                m = {**m, "ts": time.time()}
                key, value = m["conversation_id"].encode(), json.dumps(m).encode()
            await p.send_and_wait(topic, value, key=key)
            if pause_s:
                await asyncio.sleep(pause_s)
    finally:
        await p.stop()


async def collect(bootstrap: str, topic: str, until, timeout_s: float = 60.0) -> list[dict]:
    """Read `topic` from the earliest offset until `until(records)` holds or the timeout passes."""
    c = kafka.consumer(topic, bootstrap=bootstrap, fetch_max_wait_ms=500)
    await c.start()
    got: list[dict] = []
    try:
        end = time.time() + timeout_s
        while time.time() < end and not until(got):
            batch = await c.getmany(timeout_ms=300)
            for recs in batch.values():
                got.extend(json.loads(r.value) for r in recs)
    finally:
        await c.stop()
    return got


def run(coro):
    return asyncio.run(coro)
