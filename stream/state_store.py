"""Redis adapter for conversation state: one round trip to read a batch, one to write it.

Keys: `{prefix}:conv:{conversation_id}` -> Conversation bytes (TTL = idle expiry);
`{prefix}:idle:{partition}` -> sorted set of conversations with pending utterances, scored by
last activity, so the idle timer of the worker owning the partition finds them without a scan.
"""

from __future__ import annotations

from collections.abc import Iterable

import redis.asyncio as aioredis

from stream.logic import Conversation


class StateStore:
    def __init__(self, client: aioredis.Redis, ttl_s: int, prefix: str = "em"):
        self.r = client
        self.ttl_s = ttl_s
        self.prefix = prefix

    def _key(self, cid: str) -> str:
        return f"{self.prefix}:conv:{cid}"

    def _idle_key(self, partition: int) -> str:
        return f"{self.prefix}:idle:{partition}"

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
                idle = self._idle_key(partitions[cid])
                if conv.pending and not conv.ended:
                    pipe.zadd(idle, {cid: conv.last_activity})
                else:
                    pipe.zrem(idle, cid)
            await pipe.execute()

    async def idle_since(self, partition: int, before: float, limit: int = 256) -> list[str]:
        raw = await self.r.zrangebyscore(self._idle_key(partition), "-inf", before, start=0, num=limit)
        return [c.decode() if isinstance(c, bytes) else c for c in raw]

    async def forget_idle(self, partition: int, cids: Iterable[str]) -> None:
        cids = list(cids)
        if cids:
            await self.r.zrem(self._idle_key(partition), *cids)
