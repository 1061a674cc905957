"""The one load generator of the tools: what `bench` and `soak` send, and how.

Calls alternate a customer and an agent (speakers `<conversation>-0` / `-1`), with texts drawn
from the bundled sample, so every tool measures the same kind of traffic. `ts` is stamped when a
message is sent: the events' `ts_produced` then gives the end-to-end latency.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from functools import lru_cache

from stream import kafka

SENT_AT = "ts"


@lru_cache(maxsize=1)
def _sample_texts() -> tuple[str, ...]:
    from stream.tools.replay import SAMPLE, load_messages

    return tuple(m["text"] for m in load_messages(SAMPLE) if m.get("type", "utterance") == "utterance")


def sample_texts() -> list[str]:
    """The utterance texts of the bundled call-center sample."""
    return list(_sample_texts())


def call_utterance(cid: str, seq: int, text: str) -> dict:
    """Utterance `seq` of call `cid`: even seqs the customer's, odd ones the agent's."""
    return {"conversation_id": cid, "seq": seq, "speaker": f"{cid}-{seq % 2}",
            "role": "customer" if seq % 2 == 0 else "agent", "text": text}


def end_message(cid: str) -> dict:
    return {"type": "end", "conversation_id": cid}


def interleaved_calls(n_conv: int, n_utts: int, seed: int = 7, prefix: str = "bench") -> list[dict]:
    """n_utts utterances over n_conv conversations, interleaved round-robin (as many concurrent
    calls look to the worker), texts from the sample."""
    rng = random.Random(seed)
    texts = sample_texts()
    tag = uuid.uuid4().hex[:6]
    per = -(-n_utts // n_conv)
    out = [call_utterance(f"{prefix}-{tag}-{c}", i, rng.choice(texts)) for i in range(per) for c in range(n_conv)]
    return out[:n_utts]


async def send(producer, topic: str, message: dict):
    """Queue one message (keyed by its conversation id, `ts` stamped now); returns the ack future."""
    message = {**message, SENT_AT: time.time()} if message.get("type", "utterance") == "utterance" else message
    return await producer.send(topic, json.dumps(message).encode(), key=message["conversation_id"].encode())


async def produce(bootstrap: str, topic: str, messages: list[dict], rate: float | None = None) -> None:
    """Send `messages` in order, at `rate` per second (None: as fast as the producer goes), and
    wait for every ack."""
    producer = kafka.producer(bootstrap, linger_ms=2)
    await producer.start()
    try:
        futs, t0 = [], time.perf_counter()
        for i, m in enumerate(messages):
            if rate:
                delay = t0 + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            futs.append(await send(producer, topic, m))
        await asyncio.gather(*futs)
    finally:
        await producer.stop()
