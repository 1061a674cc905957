"""Redis adapter for conversation state: one round trip to read a batch, one to write it.

Keys: `{prefix}:conv:{conversation_id}` -> conversation state bytes (stream.core.codec; TTL = idle expiry);
`{prefix}:idle:{partition}` -> sorted set of open conversations with utterances awaiting a final (flush
candidates), `{prefix}:open:{partition}` -> sorted set of every open conversation (abandonment
candidates); both scored by the event time (Kafka message timestamp) of the conversation's last
utterance, so the idle timer of the worker owning the partition finds them without a scan;
`{prefix}:gap:{partition}` -> conversations with utterances waiting for a missing seq, scored by
the event time of the oldest one. `{prefix}:quarantine:{conversation_id}` -> a state that could not
be processed, set aside for inspection (same TTL).

Writes are fenced: every state carries a version, and `save` (one Lua script, atomic like the
MULTI/EXEC it replaces) writes a conversation only if the stored version is still the one that was
read. A worker that lost the partition meanwhile (a rebalance, a stalled "zombie") cannot
overwrite a newer state; its write is dropped and reported.

Redis Cluster is not supported: a batch reads and writes the keys of many conversations in one
MGET / one script, which a cluster refuses (CROSSSLOT) unless they share a hash slot.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable

import redis.asyncio as aioredis
import redis.exceptions as rx

from stream.core.codec import decode_state, dialogue_of, encode_state
from stream.core.conversation import ConversationState
from stream.core.frozen import evolve

log = logging.getLogger("emotion_monitor.state")

# Compare-and-set of a batch of states. KEYS: per conversation its state key, idle, open and gap
# set keys; then, when ARGV[2] is not '', the partition's owner key. ARGV[1]: TTL; ARGV[2]: the
# worker that must still own the partition ('' = no check: the agent, which Kafka only feeds
# partitions it owns); then per conversation: member, version read, new bytes, and the idle, open
# and gap scores ('' = remove from that set). The stored version is the first field of the state's
# JSON header (stream.core.codec). Returns the members whose write was refused.
SAVE_LUA = """
local ttl, me = ARGV[1], ARGV[2]
local n = #KEYS
local fenced = {}
if me ~= '' then
  n = n - 1
  local owner = redis.call('GET', KEYS[#KEYS])
  if owner and owner ~= me then
    for i = 0, n / 4 - 1 do fenced[#fenced + 1] = ARGV[3 + i * 6] end
    return fenced
  end
end
for i = 0, n / 4 - 1 do
  local k, a = i * 4, 3 + i * 6
  local cur = redis.call('GET', KEYS[k + 1])
  local v = 0
  if cur then v = tonumber(string.match(cur, '^{"version":(%d+)') or '0') end
  if v ~= tonumber(ARGV[a + 1]) then
    fenced[#fenced + 1] = ARGV[a]
  else
    redis.call('SET', KEYS[k + 1], ARGV[a + 2], 'EX', ttl)
    for j = 1, 3 do
      local score = ARGV[a + 2 + j]
      if score == '' then redis.call('ZREM', KEYS[k + 1 + j], ARGV[a])
      else redis.call('ZADD', KEYS[k + 1 + j], score, ARGV[a]) end
    end
  end
end
return fenced
"""

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


# Stored bytes of recently read or written states kept with their decoded state, at most this
# many bytes of them (least recently used first out): ~1,000 conversations past a full window.
KNOWN_BYTES = 64 << 20


class StateStore:
    def __init__(self, client: aioredis.Redis, ttl_s: int, prefix: str = "em",
                 on_quarantine: Callable[[str], None] | None = None, known_bytes: int = KNOWN_BYTES,
                 state_format: int = 2):
        self.r = client
        self.state_format = state_format  # of the model part of the states it writes (Settings.state_format)
        self.ttl_s = ttl_s
        self.prefix = prefix
        self.on_quarantine = on_quarantine
        self._save = client.register_script(SAVE_LUA)
        # conversation id -> (its stored bytes, their decoded state). A worker reads back, with its
        # conversation's next utterance, the bytes it wrote itself: when Redis returns exactly
        # those bytes, their state is the one kept here and they are not decoded again (the
        # header's JSON and the monitor's objects were a third of the batch's own CPU). The
        # comparison is the whole byte string, so any other writer's state (another worker, a
        # restart, an expiry and a new conversation under the same id) is decoded as before.
        self._known: OrderedDict[str, tuple[bytes, ConversationState]] = OrderedDict()
        self._known_bytes, self._known_budget = 0, known_bytes

    def _key(self, cid: str) -> str:
        return f"{self.prefix}:conv:{cid}"

    def _idle_key(self, partition: int) -> str:
        return f"{self.prefix}:idle:{partition}"

    def _open_key(self, partition: int) -> str:
        return f"{self.prefix}:open:{partition}"

    def _gap_key(self, partition: int) -> str:
        return f"{self.prefix}:gap:{partition}"

    def _owner_key(self, partition: int) -> str:
        return f"{self.prefix}:owner:{partition}"

    async def claim(self, partitions: Iterable[int], worker: str) -> None:
        """Record this worker as the owner of `partitions` (called when Kafka assigns them): a
        stalled worker that wakes up still believing it owns one sees it is not, and its idle
        timer neither flushes nor writes there."""
        partitions = list(partitions)
        if partitions:
            async with self.r.pipeline(transaction=True) as pipe:
                for p in partitions:
                    pipe.set(self._owner_key(p), worker, ex=self.ttl_s)
                await pipe.execute()

    async def owner(self, partition: int) -> str | None:
        raw = await self.r.get(self._owner_key(partition))
        return raw.decode() if isinstance(raw, bytes) else raw

    def quarantine_key(self, cid: str) -> str:
        return f"{self.prefix}:quarantine:{cid}"

    async def load(self, cids: Iterable[str]) -> dict[str, ConversationState | None]:
        """The states of `cids` (None: no state). A state that cannot be decoded is quarantined
        (moved to the quarantine key, reason logged and counted): its conversation starts over
        (context_reset) instead of failing every batch and timer run that touches it."""
        cids = list(cids)
        if not cids:
            return {}
        raw = await self.r.mget([self._key(c) for c in cids])
        out: dict[str, ConversationState | None] = {}
        known = self._known
        for c, v in zip(cids, raw):
            if v is None:
                self._forget(c)
                out[c] = None
                continue
            kept = known.get(c)
            if kept is not None and kept[0] == v:
                known.move_to_end(c)
                out[c] = kept[1]
                continue
            try:
                out[c] = decode_state(v)
            except Exception as exc:  # noqa: BLE001 - any undecodable state
                await self.quarantine(c, f"state_undecodable:{type(exc).__name__}")
                out[c] = None
                continue
            self._remember(c, v, out[c])
        return out

    def _remember(self, cid: str, data: bytes, state: ConversationState) -> None:
        """Keep `state` as the decoding of `data` (its model arrays must be views of `data`, so
        that what is kept is the stored bytes and the header's objects, not a batch's arrays)."""
        self._forget(cid)
        if len(data) > self._known_budget:
            return
        self._known[cid] = (data, state)
        self._known_bytes += len(data)
        while self._known_bytes > self._known_budget:
            _, (old, _) = self._known.popitem(last=False)
            self._known_bytes -= len(old)

    def _forget(self, cid: str) -> None:
        kept = self._known.pop(cid, None)
        if kept is not None:
            self._known_bytes -= len(kept[0])

    async def quarantine(self, cid: str, reason: str) -> None:
        """Set a conversation's state aside (for inspection, same TTL); the idle timer forgets it."""
        self._forget(cid)
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.copy(self._key(cid), self.quarantine_key(cid), replace=True)
            pipe.expire(self.quarantine_key(cid), self.ttl_s)
            pipe.delete(self._key(cid))
            await pipe.execute()
        # The reason code only: the conversation id and state are not logged.
        log.error("a conversation state was quarantined (%s); the conversation starts over with context_reset", reason)
        if self.on_quarantine is not None:
            self.on_quarantine(reason.split(":", 1)[0])

    async def save(self, convs: dict[str, ConversationState], partitions: dict[str, int],
                   owner: tuple[int, str] | None = None) -> set[str]:
        """Write the states of a batch atomically, each only if its stored version is still the one
        read (compare-and-set), and, with `owner` = (partition, worker), only while that worker is
        the partition's recorded owner. Returns the conversations whose write was refused (fenced)."""
        if not convs:
            return set()
        keys: list[str] = []
        args: list = [self.ttl_s, owner[1] if owner else ""]
        written: dict[str, tuple[bytes, ConversationState]] = {}
        for cid, conv in convs.items():
            p = partitions[cid]
            new = evolve(conv, version=conv.version + 1, partition=p)
            data = encode_state(new, self.state_format)
            written[cid] = (data, new)
            keys += [self._key(cid), self._idle_key(p), self._open_key(p), self._gap_key(p)]
            live = not conv.ended
            args += [cid, conv.version, data,
                     conv.last_event_ts if live and conv.awaiting_final else "",
                     conv.last_event_ts if live else "",
                     min(h.event_ts for h in conv.held.values()) if live and conv.held else ""]
        if owner:
            keys.append(self._owner_key(owner[0]))
        try:
            fenced = await self._save(keys=keys, args=args)
        except rx.ResponseError as exc:
            code = refusal_code(exc)
            if code is None:
                raise
            raise StateWriteRefused(code) from None  # not chained: its text quotes the state
        fenced = {f.decode() if isinstance(f, bytes) else f for f in fenced}
        for cid, (data, new) in written.items():
            if cid in fenced:
                self._forget(cid)
            else:  # what Redis now holds, and its state with the model arrays read from those bytes
                self._remember(cid, data, evolve(new, dialogue=dialogue_of(data)))
        return fenced

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
        """Open conversations with utterances awaiting a final whose last utterance is older than `before`."""
        raw = await self.r.zrangebyscore(self._idle_key(partition), "-inf", before, start=0, num=limit)
        return [c.decode() if isinstance(c, bytes) else c for c in raw]

    async def open_since(self, partition: int, before: float, limit: int = 256) -> list[str]:
        """Open conversations (awaiting finals or not) whose last utterance is older than `before`."""
        raw = await self.r.zrangebyscore(self._open_key(partition), "-inf", before, start=0, num=limit)
        return [c.decode() if isinstance(c, bytes) else c for c in raw]

    async def gap_since(self, partition: int, before: float, limit: int = 256) -> list[str]:
        """Open conversations whose oldest utterance waiting for a missing seq is older than `before`."""
        raw = await self.r.zrangebyscore(self._gap_key(partition), "-inf", before, start=0, num=limit)
        return [c.decode() if isinstance(c, bytes) else c for c in raw]

    async def newest_open(self, partition: int) -> float | None:
        """Event time of the newest utterance of an open conversation of `partition`: a lower bound
        of how far the partition's previous owner had read (a new owner's clock starts there)."""
        raw = await self.r.zrevrange(self._open_key(partition), 0, 0, withscores=True)
        return float(raw[0][1]) if raw else None

    async def forget_idle(self, partition: int, cids: Iterable[str]) -> None:
        """Drop conversations from a partition's timer sets (state gone, ended, quarantined, or
        saved from another partition since: a stale entry)."""
        cids = list(cids)
        if cids:
            async with self.r.pipeline(transaction=True) as pipe:
                pipe.zrem(self._idle_key(partition), *cids)
                pipe.zrem(self._open_key(partition), *cids)
                pipe.zrem(self._gap_key(partition), *cids)
                await pipe.execute()
