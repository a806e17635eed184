"""A key's per-client limit in the Redis gate: more windows of the same admit script call (one
round trip), exact across processes, each client address counted on its own."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from app.errors import TooManyRequests
from app.limits import ClientLimit, RedisGate
from app.tenancy.models import Tenant
from tests.support import RedisServer


@pytest.fixture
async def clients(redis_server: RedisServer) -> AsyncIterator[list[Redis]]:
    made = [
        Redis.from_url(redis_server.url, socket_connect_timeout=5.0, socket_timeout=5.0)
        for _ in range(2)
    ]
    yield made
    for client in made:
        await client.aclose()


def _gate(redis: Redis) -> RedisGate:
    return RedisGate(redis, default_rate_limit="60/minute", deadline_s=10.0)


def _tenant(**fields: Any) -> Tenant:
    return Tenant(id=f"t{uuid.uuid4().hex[:16]}", **fields)


async def test_one_round_trip_with_the_client_windows(
    clients: list[Redis], monkeypatch: pytest.MonkeyPatch
) -> None:
    redis = clients[0]
    gate = _gate(redis)
    tenant = _tenant(rate_limit="10/second;100/hour", daily_quota=50, max_concurrency=2)
    await gate.admit(tenant, cache_key=None)  # the script is loaded once, outside the count
    sent: list[str] = []
    original = redis.execute_command

    async def counting(*args: Any, **options: Any) -> Any:
        sent.append(str(args[0]))
        return await original(*args, **options)  # type: ignore[no-untyped-call]  # redis-py

    monkeypatch.setattr(redis, "execute_command", counting)
    client = ClientLimit("5/minute;20/hour", "key_1/203.0.113.7")
    admission = await gate.admit(tenant, cache_key="pgw:cache:x", client=client)
    assert sent == ["EVALSHA"]
    policies = admission.headers["RateLimit-Policy"]
    assert '"client-1minute";q=5;w=60' in policies
    assert '"client-1hour";q=20;w=3600' in policies
    assert policies.startswith('"1second";q=10;w=1, "1hour";q=100;w=3600')


async def test_exact_across_processes(clients: list[Redis]) -> None:
    gates = [_gate(redis) for redis in clients]
    tenant = _tenant(rate_limit="1000/minute")
    client = ClientLimit("5/minute", "key_1/203.0.113.7")

    async def one(n: int) -> bool:
        try:
            await gates[n % 2].admit(tenant, cache_key=None, client=client)
        except TooManyRequests:
            return False
        return True

    results = await asyncio.gather(*(one(n) for n in range(30)))
    assert sum(results) == 5
    # Another address of the same key, and the tenant, still have room.
    other = ClientLimit("5/minute", "key_1/203.0.113.8")
    admitted = await gates[0].admit(tenant, cache_key=None, client=other)
    assert admitted.headers["X-RateLimit-Remaining"] == "4"


async def test_a_batch_needs_its_cost_from_the_client_too(clients: list[Redis]) -> None:
    gate = _gate(clients[0])
    tenant = _tenant(rate_limit="100/minute")
    client = ClientLimit("3/minute", "key_1/203.0.113.7")
    with pytest.raises(TooManyRequests) as refused:
        await gate.admit(tenant, cache_key=None, cost=4, client=client)
    assert "needs 4 executions and 3 are left" in refused.value.message
    assert "each client address" in refused.value.message
    admitted = await gate.admit(tenant, cache_key=None, cost=3, client=client)
    assert admitted.headers["RateLimit"].startswith('"client";r=0;')
    # The refusal took nothing from the tenant: 100 - 3 left there.
    plain = await gate.admit(tenant, cache_key=None)
    assert plain.headers["X-RateLimit-Remaining"] == "96"
