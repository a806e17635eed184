"""admit(cost=N): a batch of N executions is admitted all or nothing, by both gates alike."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from redis.asyncio import Redis

from app.errors import TooManyRequests
from app.limits import Gate, MemoryGate, RedisGate
from app.limits.gate import Strategy
from app.redis import CONCURRENCY
from app.tenancy.models import Tenant

GateFactory = Callable[[Strategy], Gate]


def tenant(**fields: Any) -> Tenant:
    return Tenant(id=f"t{uuid.uuid4().hex[:16]}", **fields)


@pytest.fixture(params=["memory", "redis"])
def make_gate(request: pytest.FixtureRequest, redis: Redis) -> GateFactory:
    def make(strategy: Strategy) -> Gate:
        if request.param == "memory":
            return MemoryGate(default_rate_limit="60/minute", strategy=strategy)
        return RedisGate(redis, default_rate_limit="60/minute", strategy=strategy, deadline_s=10)

    return make


def _today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")


@pytest.mark.parametrize("strategy", ["fixed-window", "moving-window"])
async def test_a_cost_over_the_limit_is_refused_and_consumes_nothing(
    make_gate: GateFactory, strategy: Strategy
) -> None:
    g = make_gate(strategy)
    who = tenant(rate_limit="5/minute")
    with pytest.raises(TooManyRequests) as info:
        await g.admit(who, cache_key=None, cost=6)
    assert info.value.message == (
        "this request needs 6 executions and 5 are left: rate limit exceeded: 5 per 1 minute"
    )
    assert info.value.headers["X-RateLimit-Remaining"] == "5"
    # Nothing was taken: the five fit, in one admit, and then nothing more does.
    admitted = await g.admit(who, cache_key=None, cost=5)
    assert admitted.headers["X-RateLimit-Remaining"] == "0"
    with pytest.raises(TooManyRequests, match="rate limit exceeded: 5 per 1 minute"):
        await g.admit(who, cache_key=None)
    [today] = await g.usage(who.id, days=1)
    assert (today["executions"], today["rate_limited"]) == (5, 2)


async def test_the_refusal_names_what_is_left(make_gate: GateFactory) -> None:
    g = make_gate("fixed-window")
    who = tenant(rate_limit="5/minute")
    await g.admit(who, cache_key=None, cost=2)
    with pytest.raises(TooManyRequests) as info:
        await g.admit(who, cache_key=None, cost=4)
    assert info.value.message.startswith("this request needs 4 executions and 3 are left: ")
    await g.admit(who, cache_key=None, cost=3)  # exactly what was left


async def test_a_cost_counts_against_the_daily_quota(make_gate: GateFactory) -> None:
    g = make_gate("fixed-window")
    who = tenant(rate_limit="100/minute", daily_quota=4)
    admitted = await g.admit(who, cache_key=None, cost=3)
    assert admitted.headers["RateLimit"].startswith('"daily";r=1;')
    with pytest.raises(TooManyRequests) as info:
        await g.admit(who, cache_key=None, cost=2)
    assert info.value.message.startswith(
        "this request needs 2 executions and 1 are left: daily quota of 4 executions reached"
    )
    await g.admit(who, cache_key=None)  # the refusal ate none of the quota


async def test_a_cost_takes_one_lease(make_gate: GateFactory, redis: Redis) -> None:
    g = make_gate("fixed-window")
    who = tenant(rate_limit="100/minute", max_concurrency=2)
    batch = await g.admit(who, cache_key=None, cost=10)
    assert batch.lease is not None
    other = await g.admit(who, cache_key=None)  # a second lease still fits under the cap of 2
    with pytest.raises(TooManyRequests, match="concurrency limit of 2"):
        await g.admit(who, cache_key=None, cost=3)
    await g.finish(batch, error=False, cpu_time_ms=0, wall_time_ms=0)
    await g.finish(other, error=False, cpu_time_ms=0, wall_time_ms=0)
    if isinstance(g, RedisGate):
        assert await redis.zcard(f"{CONCURRENCY}{who.id}") == 0


async def test_leases_asked_for_are_granted_as_far_as_free(
    make_gate: GateFactory, redis: Redis
) -> None:
    g = make_gate("fixed-window")
    who = tenant(rate_limit="100/minute", max_concurrency=3)
    execute = await g.admit(who, cache_key=None)
    batch = await g.admit(who, cache_key=None, cost=5, leases=5)
    assert (execute.leases, batch.leases) == (1, 2)  # what was left of the cap of 3
    with pytest.raises(TooManyRequests, match="concurrency limit of 3"):
        await g.admit(who, cache_key=None, leases=2)
    await g.finish(batch, error=False, cpu_time_ms=0, wall_time_ms=0)
    if isinstance(g, RedisGate):
        assert await redis.zcard(f"{CONCURRENCY}{who.id}") == 1
    # Both of the batch's leases are back: two more fit beside the execute's.
    again = await g.admit(who, cache_key=None, cost=2, leases=2)
    assert again.leases == 2
    for admission in (again, execute):
        await g.finish(admission, error=False, cpu_time_ms=0, wall_time_ms=0)
    if isinstance(g, RedisGate):
        assert await redis.zcard(f"{CONCURRENCY}{who.id}") == 0


async def test_finish_counts_cache_hits(make_gate: GateFactory) -> None:
    g = make_gate("fixed-window")
    who = tenant(rate_limit="100/minute")
    admission = await g.admit(who, cache_key=None, cost=4)
    await g.finish(admission, error=False, cpu_time_ms=12, wall_time_ms=30, cache_hits=3)
    [today] = await g.usage(who.id, days=1)
    assert today["date"] == _today()
    assert (today["executions"], today["cache_hits"], today["cpu_time_ms"]) == (4, 3, 12)
