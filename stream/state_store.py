"""Redis adapter for conversation state: one round trip to read a batch, one to write it.

Keys: `{prefix}:conv:{conversation_id}` -> Conversation bytes (TTL = idle expiry);
`{prefix}:idle:{partition}` -> sorted set of open conversations with pending utterances (flush
candidates), `{prefix}:open:{partition}` -> sorted set of every open conversation (abandonment
candidates); both scored by the event time (Kafka message timestamp) of the conversation's last
utterance, so the idle timer of the worker owning the partition finds them without a scan.
"""

from __future__ import annotations

from collections.abc import Iterable

import redis.asyncio as aioredis
import redis.exceptions as rx

from stream.logic import Conversation


# Redis answers but refuses writes: not a connection problem, and not something retrying at once
# fixes; the batch's state write is retried with backoff until Redis accepts writes again.
REFUSALS = {
    "OOM": "used memory is over maxmemory and the eviction policy is noeviction",
    "READONLY": "this Redis is a read-only replica (after a failover?); point the worker at the primary",
    "EXECABORT": "the transaction was aborted because Redis refused one of its commands",
    "MISCONF": "Redis cannot persist (RDB snapshot failing) and stops writes",
    "NOREPLICAS": "not enough replicas acknowledge writes (min-replicas-to-write)",
    "MASTERDOWN": "the replica lost its primary",
    "CLUSTERDOWN": "the cluster is down",
    "TRYAGAIN": "the cluster is resharding",
}


class StateWriteRefused(Exception):
    """Redis refused the state write (`code` is one of REFUSALS). The message never carries the
    redis-py text, which quotes the refused command with its arguments (conversation state)."""

    def __init__(self, code: str):
        self.code = code
        super().__init__(f"Redis refuses writes ({code}: {REFUSALS.get(code, 'see the Redis log')})")


def refusal_code(exc: BaseException) -> str | None:
    """The REFUSALS code of a Redis error that means "Redis answers but will not write", else None."""
    if isinstance(exc, rx.OutOfMemoryError):
        return "OOM"
    if isinstance(exc, rx.ReadOnlyError):
        return "READONLY"
    if isinstance(exc, rx.ExecAbortError):
        return "EXECABORT"
    if isinstance(exc, rx.ResponseError):
        # redis-py strips the code of the errors it has a class for; the others keep it in the text
        # (also when quoted by a pipeline: "Command # 1 (...) of pipeline caused error: (MISCONF ...")
        text = str(exc)
        for code in REFUSALS:
            if text.startswith(code + " ") or f"('{code} " in text or f'("{code} ' in text:
                return code
    return None


class StateStore:
    def __init__(self, client: aioredis.Redis, ttl_s: int, prefix: str = "em"):
        self.r = client
        self.ttl_s = ttl_s
        self.prefix = prefix

    def _key(self, cid: str) -> str:
        return f"{self.prefix}:conv:{cid}"

    def _idle_key(self, partition: int) -> str:
        return f"{self.prefix}:idle:{partition}"

    def _open_key(self, partition: int) -> str:
        return f"{self.prefix}:open:{partition}"

    async def load(self, cids: Iterable[str]) -> dict[str, Conversation | None]:
        cids = list(cids)
        if not cids:
            return {}
        raw = await self.r.mget([self._key(c) for c in cids])
        return {c: (Conversation.from_bytes(v) if v is not None else None) for c, v in zip(cids, raw)}

    async def save(self, convs: dict[str, Conversation], partitions: dict[str, int]) -> None:
        """MULTI/EXEC: every conversation of the batch is written, or none is."""
        if not convs:
            return
        async with self.r.pipeline(transaction=True) as pipe:
            for cid, conv in convs.items():
                pipe.set(self._key(cid), conv.to_bytes(), ex=self.ttl_s)
                idle, open_ = self._idle_key(partitions[cid]), self._open_key(partitions[cid])
                if conv.pending and not conv.ended:
                    pipe.zadd(idle, {cid: conv.last_event_ts})
                else:
                    pipe.zrem(idle, cid)
                if not conv.ended:
                    pipe.zadd(open_, {cid: conv.last_event_ts})
                else:
                    pipe.zrem(open_, cid)
            try:
                await pipe.execute()
            except rx.ResponseError as exc:
                code = refusal_code(exc)
                if code is None:
                    raise
                raise StateWriteRefused(code) from None  # not chained: its text quotes the state

    async def probe_write(self) -> str | None:
        """Readiness: write a tiny key. None when Redis accepts it, else the refusal code."""
        try:
            await self.r.set(f"{self.prefix}:probe", b"1", ex=60)
        except rx.ResponseError as exc:
            code = refusal_code(exc)
            if code is None:
                raise
            return code
        return None

    async def idle_since(self, partition: int, before: float, limit: int = 256) -> list[str]:
        """Open conversations with pending utterances whose last utterance is older than `before`."""
        raw = await self.r.zrangebyscore(self._idle_key(partition), "-inf", before, start=0, num=limit)
        return [c.decode() if isinstance(c, bytes) else c for c in raw]

    async def open_since(self, partition: int, before: float, limit: int = 256) -> list[str]:
        """Open conversations (pending or not) whose last utterance is older than `before`."""
        raw = await self.r.zrangebyscore(self._open_key(partition), "-inf", before, start=0, num=limit)
        return [c.decode() if isinstance(c, bytes) else c for c in raw]

    async def newest_open(self, partition: int) -> float | None:
        """Event time of the newest utterance of an open conversation of `partition`: a lower bound
        of how far the partition's previous owner had read (a new owner's clock starts there)."""
        raw = await self.r.zrevrange(self._open_key(partition), 0, 0, withscores=True)
        return float(raw[0][1]) if raw else None

    async def forget_idle(self, partition: int, cids: Iterable[str]) -> None:
        """Drop conversations whose state is gone (expired) from both sets."""
        cids = list(cids)
        if cids:
            async with self.r.pipeline(transaction=True) as pipe:
                pipe.zrem(self._idle_key(partition), *cids)
                pipe.zrem(self._open_key(partition), *cids)
                await pipe.execute()
