"""The in-process gate, for when GATEWAY_REDIS_URL is unset: one process only.

The windows are counted by the `limits` library's own MemoryStorage and strategies; the quota,
leases and usage are plain dicts, and the cache entry is peeked at in the process's
`MemoryCacheStore` (as the Redis gate's script reads it in Redis). One lock around each admit
makes the check-then-take atomic, as the Lua script is in Redis: a refused request consumes
nothing.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from limits.aio.storage import MemoryStorage
from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter, RateLimiter

from app.cache.store import MemoryCacheStore
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

__all__ = ["MemoryGate"]


class MemoryGate:
    """The gate for a single process without Redis (development, `piston-gateway dev`)."""

    def __init__(
        self,
        *,
        default_rate_limit: str,
        strategy: Strategy = "fixed-window",
        metrics: Metrics | None = None,
        cache: MemoryCacheStore | None = None,
    ) -> None:
        self._default_rate_limit = default_rate_limit
        self._strategy: Strategy = strategy
        self._metrics = metrics
        self._storage = MemoryStorage()
        self._limiter: RateLimiter = (
            MovingWindowRateLimiter(self._storage)
            if strategy == "moving-window"
            else FixedWindowRateLimiter(self._storage)
        )
        self._lock = asyncio.Lock()
        self._quota: dict[tuple[str, str], int] = {}
        self._leases: dict[str, dict[str, float]] = {}  # tenant -> lease -> expiry (monotonic)
        self._usage: dict[tuple[str, str], UsageCounters] = {}
        self._cache = cache if cache is not None else MemoryCacheStore()

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
        now = time.time()
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
                held[lease_id] = time.monotonic() + lease_ttl_ms / 1000
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
        now = time.monotonic()
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
        keep = set(usage_days(time.time(), MAX_USAGE_DAYS))
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
            for day in usage_days(time.time(), days)
        ]
