"""The in-process gate, for when GATEWAY_REDIS_URL is unset: one process only.

The windows are counted by the `limits` library's own strategies, over its MemoryStorage made
to read the gate's clock (`ClockedMemoryStorage`); the quota, leases and usage are plain dicts,
and the cache entry is peeked at in the process's `MemoryCacheStore` (as the Redis gate's script
reads it in Redis). One lock around each admit makes the check-then-take atomic, as the Lua
script is in Redis: a refused request consumes nothing. Time (windows, leases, days) comes from
the gate's `Clock`, which tests move.
"""

from __future__ import annotations

import asyncio
import bisect
import uuid
from typing import Final

from limits.aio.storage import MemoryStorage
from limits.aio.storage.memory import Entry
from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter, RateLimiter

from app.cache.store import MemoryCacheStore
from app.clock import SYSTEM_CLOCK, Clock
from app.limits.gate import (
    DEFAULT_LEASE_TTL_MS,
    MAX_USAGE_DAYS,
    Admission,
    ClientLimit,
    Counted,
    PolicyState,
    Refusal,
    Strategy,
    UsageCounters,
    counted_windows,
    lease_ids,
    quota_state,
    rate_limit_headers,
    refuse,
    usage_days,
    usage_row,
    utc_day,
    windows_for,
)
from app.metrics import Metrics
from app.tenancy.models import Tenant

__all__ = ["ClockedMemoryStorage", "MemoryGate"]

# Keys held before the first sweep of expired ones; after it, twice what the sweep left.
_SWEEP_MIN_KEYS: Final = 1024


class _Entry(Entry):
    """One hit in a moving window, stamped by the clock (the library's own reads time.time())."""

    def __init__(self, atime: float, expiry: float) -> None:  # not super's: it reads the time
        self.atime = atime
        self.expiry = atime + expiry


class ClockedMemoryStorage(MemoryStorage):
    """The `limits` library's in-process storage, reading the time from a `Clock`.

    The library reads `time.time()` itself, which no test can move: the methods the fixed and
    moving window strategies call are these, the same logic on `clock.wall`. Its background
    expiry task is replaced by a sweep of the expired keys when a new key would pass a bound
    (twice what the last sweep left), so memory stays bounded by the live windows, amortized
    O(1); and a moving window keeps only its `limit` newest entries, the only ones it reads.
    Used by the in-process gate and failed-attempt limiter, which never await inside a window
    operation (so the library's per-key locks are not needed).
    """

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        super().__init__()
        self._now = clock.wall
        self._sweep_at = _SWEEP_MIN_KEYS

    async def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        now = self._now()
        if self.expirations.get(key, 0) <= now:
            self._drop(key)
            self._sweep(now)
        self.storage[key] += amount
        if self.storage[key] == amount:
            self.expirations[key] = now + expiry
        return self.storage[key]

    async def get(self, key: str) -> int:
        if self.expirations.get(key, 0) <= self._now():
            self._drop(key)
        return self.storage.get(key, 0)

    async def get_expiry(self, key: str) -> float:
        return self.expirations.get(key, self._now())

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        if amount > limit:
            return False
        now = self._now()
        events = self.events.get(key)
        if events is None:
            self._sweep(now)
            events = self.events[key] = []
        # Newest first: the entry `limit - amount` back must have left the window.
        oldest = events[limit - amount] if len(events) > limit - amount else None
        if oldest is not None and oldest.atime >= now - expiry:
            return False
        entry = _Entry(now, expiry)
        events[:0] = [entry] * amount
        del events[limit:]  # older ones are out of the window: it never holds more than limit
        return True

    async def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        now = self._now()
        events = self.events.get(key, [])
        inside = bisect.bisect_left(events, -(now - expiry), key=lambda e: -e.atime)
        if inside:
            return events[inside - 1].atime, inside
        return now, 0  # none in the window (the library's sweep would have dropped the rest)

    def _drop(self, key: str) -> None:
        self.storage.pop(key, None)
        self.expirations.pop(key, None)

    def _sweep(self, now: float) -> None:
        if len(self.expirations) + len(self.events) < self._sweep_at:
            return
        for key in [key for key, expiry in self.expirations.items() if expiry <= now]:
            self._drop(key)
        for key in [key for key, entries in self.events.items() if entries[0].expiry <= now]:
            del self.events[key]  # (a list is never left empty: the first acquire fills it)
        self._sweep_at = max(_SWEEP_MIN_KEYS, 2 * (len(self.expirations) + len(self.events)))


class MemoryGate:
    """The gate for a single process without Redis (development, `piston-gateway dev`)."""

    def __init__(
        self,
        *,
        default_rate_limit: str,
        strategy: Strategy = "fixed-window",
        metrics: Metrics | None = None,
        cache: MemoryCacheStore | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._default_rate_limit = default_rate_limit
        self._strategy: Strategy = strategy
        self._metrics = metrics
        self._now = clock.wall
        self._monotonic = clock.monotonic
        self._storage = ClockedMemoryStorage(clock)
        self._limiter: RateLimiter = (
            MovingWindowRateLimiter(self._storage)
            if strategy == "moving-window"
            else FixedWindowRateLimiter(self._storage)
        )
        self._lock = asyncio.Lock()
        self._quota: dict[tuple[str, str], int] = {}
        self._leases: dict[str, dict[str, float]] = {}  # tenant -> lease -> expiry (monotonic)
        self._usage: dict[tuple[str, str], UsageCounters] = {}
        self._cache = cache if cache is not None else MemoryCacheStore(clock=clock)

    async def admit(
        self,
        tenant: Tenant,
        *,
        cache_key: str | None,
        lease_ttl_ms: int = DEFAULT_LEASE_TTL_MS,
        cost: int = 1,
        client: ClientLimit | None = None,
        leases: int = 1,
        flight: str | None = None,  # one process: single-flight is in-process, nothing to claim
        flight_lease_ms: int = 0,
    ) -> Admission:
        now = self._now()
        day = utc_day(now)
        windows = counted_windows(
            tenant.rate_limit or self._default_rate_limit, client, self._strategy
        )
        quota = tenant.daily_quota or 0
        usage = self._usage_for(tenant.id, day)
        cached = self._cache.peek(cache_key) if cache_key else None
        async with self._lock:
            # Read every window first: a refusal by one must not consume the others.
            allowed = [
                await self._limiter.test(w.item, tenant.id, *w.identity, cost=cost) for w in windows
            ]
            quota_used = self._quota.get((tenant.id, day), 0)
            held = self._live_leases(tenant.id)
            want_lease = bool(tenant.max_concurrency) and cached is None
            reason: Refusal | None = None
            if not all(allowed):
                reason = "rate_limit"
            elif quota and quota_used + cost > quota:
                reason = "quota"
            elif want_lease and len(held) >= (tenant.max_concurrency or 0):
                reason = "concurrency"
            if reason is None:
                for w in windows:
                    await self._limiter.hit(w.item, tenant.id, *w.identity, cost=cost)
                if quota:
                    quota_used += cost
                    self._quota[(tenant.id, day)] = quota_used
            states = []
            for w in windows:
                stats = await self._limiter.get_window_stats(w.item, tenant.id, *w.identity)
                states.append(
                    PolicyState(w.name, w.amount, w.seconds, stats.remaining, stats.reset_time)
                )
        if quota:
            states.append(quota_state(quota, quota_used, day))
        headers = rate_limit_headers(states, now)

        if reason is not None:
            usage.add("rate_limited")
            counted = Counted(
                windows=[
                    (w, state, not ok)
                    for w, state, ok in zip(windows, states[: len(windows)], allowed, strict=True)
                ],
                headers=headers,
                now=now,
                day=day,
                quota=quota,
                quota_used=quota_used,
                cost=cost,
                max_concurrency=tenant.max_concurrency,
            )
            raise refuse(reason, counted, metrics=self._metrics)

        lease, granted = None, 1
        if want_lease:
            lease = uuid.uuid4().hex
            # One lease, or as many of those wanted as are free (at least the one checked above).
            granted = min(max(1, leases), (tenant.max_concurrency or 0) - len(held))
            for lease_id in lease_ids(lease, granted):
                held[lease_id] = self._monotonic() + lease_ttl_ms / 1000
        usage.add("executions", cost)
        if cached is not None:
            usage.add("cache_hits")
        return Admission(
            headers=headers,
            cached=cached,
            lease=lease,
            tenant_id=tenant.id,
            day=day,
            leases=granted,
        )

    def _live_leases(self, tenant_id: str) -> dict[str, float]:
        """The tenant's leases, the expired ones dropped (a request that never finished)."""
        leases = self._leases.setdefault(tenant_id, {})
        now = self._monotonic()
        for lease in [lease for lease, expiry in leases.items() if expiry <= now]:
            del leases[lease]
        return leases

    def _usage_for(self, tenant_id: str, day: str) -> UsageCounters:
        counters = self._usage.get((tenant_id, day))
        if counters is None:
            counters = self._usage[(tenant_id, day)] = UsageCounters()
            self._forget_old_usage()
        return counters

    def _forget_old_usage(self) -> None:
        """Keep 31 days, as Redis does: runs when a new tenant-day starts, so rarely."""
        keep = set(usage_days(self._now(), MAX_USAGE_DAYS))
        for key in [key for key in self._usage if key[1] not in keep]:
            del self._usage[key]

    async def finish(
        self,
        admission: Admission,
        *,
        error: bool,
        cpu_time_ms: float,
        wall_time_ms: float,
        cache_hits: int = 0,
    ) -> None:
        held = self._leases.get(admission.tenant_id, {})
        for lease_id in admission.lease_ids():
            held.pop(lease_id, None)
        usage = self._usage_for(admission.tenant_id, admission.day)
        if error:
            usage.add("errors")
        if cache_hits:
            usage.add("cache_hits", cache_hits)
        usage.add("cpu_time_ms", cpu_time_ms)
        usage.add("wall_time_ms", wall_time_ms)

    async def forget(self, tenant: Tenant) -> None:
        """A tenant created later under the same id starts from zero."""
        async with self._lock:
            for limit in {tenant.rate_limit or self._default_rate_limit, self._default_rate_limit}:
                for window in windows_for(limit, self._strategy):
                    await self._limiter.clear(window.item, tenant.id)
            self._leases.pop(tenant.id, None)
            for key in [key for key in self._quota if key[0] == tenant.id]:
                del self._quota[key]
            for key in [key for key in self._usage if key[0] == tenant.id]:
                del self._usage[key]

    async def usage(self, tenant_id: str, days: int = 7) -> list[dict[str, object]]:
        empty = UsageCounters()
        return [
            usage_row(day, self._usage.get((tenant_id, day), empty).values)
            for day in usage_days(self._now(), days)
        ]
