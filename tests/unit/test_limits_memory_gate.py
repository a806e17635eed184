"""The in-process gate (no GATEWAY_REDIS_URL): the same promises as the Redis gate, one process."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import limits.aio.storage.memory as limits_memory
import pytest
from limits import parse
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter

from app.cache.store import MemoryCacheStore
from app.errors import TooManyRequests
from app.limits import Admission, MemoryGate, create_gate
from app.limits.gate import Strategy
from app.limits.memory_gate import ClockedMemoryStorage
from app.metrics import Metrics
from app.settings import Settings
from app.tenancy.models import Tenant
from tests.support import MovableClock


def tenant(**fields: Any) -> Tenant:
    return Tenant(id=f"t{uuid.uuid4().hex[:16]}", **fields)


def gate(strategy: Strategy = "fixed-window", **kw: Any) -> MemoryGate:
    return MemoryGate(default_rate_limit="60/minute", strategy=strategy, **kw)


async def _burst(
    g: MemoryGate, who: Tenant, n: int
) -> tuple[list[Admission], list[TooManyRequests]]:
    results = await asyncio.gather(
        *(g.admit(who, cache_key=None) for _ in range(n)), return_exceptions=True
    )
    admitted = [r for r in results if isinstance(r, Admission)]
    refused = [r for r in results if isinstance(r, TooManyRequests)]
    assert len(admitted) + len(refused) == n
    return admitted, refused


def test_create_gate_without_redis_is_in_process() -> None:
    assert isinstance(create_gate(None, settings=Settings(), metrics=None), MemoryGate)


@pytest.mark.parametrize("strategy", ["fixed-window", "moving-window"])
async def test_exact_under_a_burst(strategy: Strategy) -> None:
    metrics = Metrics()
    g = gate(strategy, metrics=metrics)
    admitted, refused = await _burst(g, tenant(rate_limit="20/minute"), 60)
    assert len(admitted) == 20
    assert sorted(int(a.headers["X-RateLimit-Remaining"]) for a in admitted) == list(range(20))
    assert {e.message for e in refused} == {"rate limit exceeded: 20 per 1 minute"}
    assert {e.headers["X-RateLimit-Remaining"] for e in refused} == {"0"}
    assert all(int(e.headers["Retry-After"]) >= 1 for e in refused)
    assert metrics.rejected.labels(reason="rate_limit")._value.get() == 40


@pytest.mark.parametrize("strategy", ["fixed-window", "moving-window"])
async def test_several_windows_refusal_consumes_nothing(strategy: Strategy) -> None:
    clock = MovableClock()
    g = gate(strategy, clock=clock)
    who = tenant(rate_limit="2/second;3/minute")
    admitted, refused = await _burst(g, who, 4)
    assert len(admitted) == 2
    assert admitted[0].headers["RateLimit-Policy"] == '"1second";q=2;w=1, "1minute";q=3;w=60'
    clock.advance(1.1)  # the one-second window rolls over
    admitted, refused = await _burst(g, who, 3)
    assert len(admitted) == 1  # 3 of 3 in the minute; the 2 refusals counted nowhere
    assert {e.message for e in refused} == {"rate limit exceeded: 3 per 1 minute"}


async def test_quota_concurrency_cache_and_usage() -> None:
    clock = MovableClock()
    cache = MemoryCacheStore(clock=clock)
    g = gate(cache=cache, clock=clock)
    who = tenant(rate_limit="100/minute", daily_quota=4, max_concurrency=1)
    first = await g.admit(who, cache_key="k1")
    assert first.cached is None
    assert first.lease is not None
    with pytest.raises(TooManyRequests, match="concurrency limit of 1 executions in flight"):
        await g.admit(who, cache_key=None)
    await g.finish(first, error=True, cpu_time_ms=5, wall_time_ms=7.5)
    await cache.write("k1", b"body", 60)
    hit = await g.admit(who, cache_key="k1")
    assert (hit.cached, hit.lease) == (b"body", None)
    expiring = await g.admit(who, cache_key=None, lease_ttl_ms=20)
    assert expiring.lease is not None
    clock.advance(0.05)  # never finished: its lease expires
    await g.admit(who, cache_key=None)  # 4 of 4
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%d")
    with pytest.raises(TooManyRequests) as info:
        await g.admit(who, cache_key="k1")
    assert info.value.message == (
        f"daily quota of 4 executions reached; it resets at {tomorrow}T00:00:00Z"
    )
    assert info.value.headers["X-RateLimit-Remaining"] == "0"
    today, yesterday = await g.usage(who.id, days=2)
    assert today == {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "executions": 4,
        "cache_hits": 1,
        "rate_limited": 2,
        "errors": 1,
        "cpu_time_ms": 5,
        "wall_time_ms": 7.5,
    }
    assert yesterday["executions"] == 0


async def test_cache_is_bounded_and_expires() -> None:
    clock = MovableClock()
    g = MemoryCacheStore(max_entries=2, clock=clock)
    await g.write("a", b"1", 60)
    await g.write("b", b"2", 60)
    await g.read("a")  # a is now the most recently used
    await g.write("c", b"3", 60)
    assert (await g.read("a"), await g.read("b"), await g.read("c")) == (b"1", None, b"3")
    await g.write("d", b"4", 0)  # a TTL of 0 stores nothing
    assert await g.read("d") is None
    await g.write("e", b"5", 60)
    clock.advance(59.9)
    assert await g.read("e") == b"5"
    clock.advance(0.1)  # its TTL is over
    assert await g.read("e") is None


@pytest.mark.parametrize("strategy", ["fixed-window", "moving-window"])
async def test_expired_windows_do_not_pile_up(strategy: Strategy) -> None:
    # Tenants come and go: the windows of those gone quiet are dropped, not kept forever.
    clock = MovableClock()
    g = gate(strategy, clock=clock)
    for _ in range(3_000):
        await g.admit(tenant(rate_limit="5/second"), cache_key=None)
        clock.advance(0.01)
    storage = g._storage
    assert len(storage.expirations) + len(storage.events) < 2_100


@pytest.mark.parametrize("strategy", ["fixed-window", "moving-window"])
async def test_clocked_storage_counts_as_the_library_does(
    strategy: Strategy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The library's own MemoryStorage, made to read the same clock, is the oracle."""
    clock = MovableClock()
    monkeypatch.setattr(limits_memory, "time", SimpleNamespace(time=clock.wall))
    limiter = MovingWindowRateLimiter if strategy == "moving-window" else FixedWindowRateLimiter
    ours, theirs = limiter(ClockedMemoryStorage(clock)), limiter(MemoryStorage())
    items = [parse("3/second"), parse("5/2 seconds")]
    rng = random.Random(12)
    for _ in range(3_000):
        item, who, cost = rng.choice(items), rng.choice("ab"), rng.choice([1, 1, 2])
        op = rng.choice(["hit", "test", "stats", "advance"])
        if op == "advance":
            clock.advance(rng.choice([0.05, 0.3, 0.7, 1.0, 2.5]))
        elif op == "hit":
            assert await ours.hit(item, who, cost=cost) == await theirs.hit(item, who, cost=cost)
        elif op == "test":
            assert await ours.test(item, who, cost=cost) == await theirs.test(item, who, cost=cost)
        else:
            mine = await ours.get_window_stats(item, who)
            library = await theirs.get_window_stats(item, who)
            assert mine.remaining == library.remaining
            if mine.remaining < item.amount:  # an empty window's reset: see get_moving_window
                assert mine.reset_time == library.reset_time
