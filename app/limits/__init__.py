"""Rate limits, concurrency leases, daily quotas and usage counting for the hot path.

Why not slowapi's decorator: its check is synchronous, so with Redis storage it blocks the event
loop on every request (slowapi issue #3), and its default handler turns a Redis error into a 500
on every route (#253). We keep slowapi's limit syntax (the `limits` library's `60/minute`,
`10/second;500/hour`) and its header names, and do the counting ourselves: one Lua script per
request (`RedisGate`), so the rate-limit windows, the daily quota, the concurrency lease, the
usage counters, the cache read and a miss's single-flight claim (deliberate crossings into
`app.cache`) cost one Redis round trip together; one more after the run finishes the request
and, for a claimed miss, lands its flight (store, release, wake-up).

Exports:
- `Admission`, `Gate`, `RedisGate`, `MemoryGate`, `create_gate`: the per-tenant gate.
- `UpstreamSlots`: the per-process cap on executions in flight to the upstreams.
- `AuthFailureLimiter`, `client_address`: failed authentications per client address.
"""

from __future__ import annotations

from redis.asyncio import Redis

from app.cache.store import CacheStore, MemoryCacheStore
from app.limits.failures import AuthFailureLimiter, client_address
from app.limits.gate import DEFAULT_LEASE_TTL_MS, USAGE_FIELDS, Admission, ClientLimit, Gate
from app.limits.memory_gate import MemoryGate
from app.limits.redis_gate import RedisGate
from app.limits.slots import UpstreamSlots
from app.metrics import Metrics
from app.redis_outage import RedisOutage
from app.redis_pipeline import PipelinedRedis
from app.settings import Settings

__all__ = [
    "DEFAULT_LEASE_TTL_MS",
    "USAGE_FIELDS",
    "Admission",
    "AuthFailureLimiter",
    "ClientLimit",
    "Gate",
    "MemoryGate",
    "RedisGate",
    "UpstreamSlots",
    "client_address",
    "create_gate",
]


def create_gate(
    redis: Redis | None,
    *,
    settings: Settings,
    metrics: Metrics | None,
    outage: RedisOutage | None = None,
    cache: CacheStore | None = None,
    scripts: PipelinedRedis | None = None,
) -> Gate:
    """The Redis gate when the app has Redis, else the in-process one (one process only).

    The in-process gate reads the entries of the process's `MemoryCacheStore`, `cache`."""
    if redis is None:
        return MemoryGate(
            default_rate_limit=settings.default_rate_limit,
            strategy=settings.rate_limit_strategy,
            metrics=metrics,
            cache=cache if isinstance(cache, MemoryCacheStore) else None,
        )
    return RedisGate(
        redis,
        default_rate_limit=settings.default_rate_limit,
        strategy=settings.rate_limit_strategy,
        fail_open=settings.rate_limit_fail_open,
        metrics=metrics,
        outage=outage,
        scripts=scripts,
    )
