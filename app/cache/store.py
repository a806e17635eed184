"""The cache's one read/write API: `CacheStore.read(key)` and `CacheStore.write(key, body, ttl)`.

The entry is the exact bytes that go out. `RedisCacheStore` keeps it in Redis (`pgw:cache:`),
shared by every replica; `MemoryCacheStore` in this process, for a gateway without Redis.

The deliberate crossings, each to spare a round trip: a cache hit must cost one, so the
admission's read of the entry rides in the gate's admit script (`app.limits.redis_gate`,
ADMIT_SCRIPT's KEYS[1]) and the in-process gate peeks at its `MemoryCacheStore`; a miss must cost
two before its answer, so the write of the answer of a miss whose admit claimed the flight lock
rides in that admission's finish script (FINISH_SCRIPT, with the lock's release). Every other
read and write goes through here (single-flight waiters, batch cases, a flight that took its
lock itself, a run whose request left before it landed).
Redis faults never fail a request: a read is a miss, a write is a lost future hit.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Final, Protocol

from redis.asyncio import Redis

from app.clock import SYSTEM_CLOCK, Clock
from app.redis_outage import OUTAGE_ERRORS, REDIS_DEADLINE_S, RedisOutage

__all__ = ["CacheStore", "MemoryCacheStore", "RedisCacheStore", "create_cache_store"]

_DEFAULT_MEMORY_ENTRIES: Final = 10_000


class CacheStore(Protocol):
    async def read(self, key: str) -> bytes | None: ...

    async def write(self, key: str, body: bytes, ttl_seconds: int) -> None: ...


class RedisCacheStore:
    """Entries in Redis; the process's `RedisOutage` spares calls while Redis is unreachable."""

    def __init__(
        self, redis: Redis, *, outage: RedisOutage, deadline_s: float = REDIS_DEADLINE_S
    ) -> None:
        self._redis = redis
        self._outage = outage
        self._deadline_s = deadline_s

    async def read(self, key: str) -> bytes | None:
        """The entry, or None when absent or when Redis does not answer."""
        if self._outage.active:
            return None
        try:
            async with asyncio.timeout(self._deadline_s):
                value: bytes | str | None = await self._redis.get(key)
        except OUTAGE_ERRORS as exc:
            self._outage.failed(exc, by="cache_read")
            return None
        return value.encode() if isinstance(value, str) else value

    async def write(self, key: str, body: bytes, ttl_seconds: int) -> None:
        """Store an entry; a failure only costs a future hit, so it is logged, not raised."""
        if ttl_seconds <= 0 or self._outage.active:
            return
        try:
            async with asyncio.timeout(self._deadline_s):
                await self._redis.set(key, body, ex=ttl_seconds)
        except OUTAGE_ERRORS as exc:
            self._outage.failed(exc, by="cache_store")


class MemoryCacheStore:
    """Entries in this process, least recently used first out past `max_entries`."""

    def __init__(
        self, *, max_entries: int = _DEFAULT_MEMORY_ENTRIES, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._max_entries = max_entries
        self._monotonic = clock.monotonic  # entries expire on it (tests move it)

    def peek(self, key: str) -> bytes | None:
        """The entry without awaiting: the in-process gate's read inside its admission."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        expiry, body = entry
        if expiry <= self._monotonic():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return body

    async def read(self, key: str) -> bytes | None:
        return self.peek(key)

    async def write(self, key: str, body: bytes, ttl_seconds: int) -> None:
        if ttl_seconds <= 0:
            return
        self._entries[key] = (self._monotonic() + ttl_seconds, body)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)


def create_cache_store(redis: Redis | None, *, outage: RedisOutage) -> CacheStore:
    return RedisCacheStore(redis, outage=outage) if redis is not None else MemoryCacheStore()
