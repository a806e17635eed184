"""Redis stopped mid-test: fail closed (503) or open (unlimited), no hang, recovery without restart.

Each test stops and starts a redis-server of its own, so the suite's shared one is not disturbed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from redis.asyncio import Redis

from app.cache.store import RedisCacheStore
from app.errors import ServiceUnavailable, TooManyRequests
from app.limits import Admission, AuthFailureLimiter, RedisGate
from app.redis import CACHE, open_redis
from app.redis_outage import RedisOutage
from app.settings import Settings
from app.tenancy.models import Tenant
from tests.support import RedisServer

# Generous: the point is that admit() returns instead of hanging, not how fast it does.
_PROMPTLY_S = 3.0


@pytest.fixture
def server() -> Iterator[RedisServer]:
    own = RedisServer()
    own.start()
    yield own
    own.stop()


@pytest.fixture
async def client(server: RedisServer) -> AsyncIterator[Redis]:
    """The client the gateway runs on (app.redis.open_redis), on this module's own server."""
    redis = open_redis(server.url, name="pgw-test")
    yield redis
    await redis.aclose()


def tenant(**fields: Any) -> Tenant:
    return Tenant(id=f"t{uuid.uuid4().hex[:16]}", rate_limit="3/minute", **fields)


_RECOVERY_S = 5.0  # the contract: recovered within 5 s of Redis coming back


async def admitted_after_recovery(gate: RedisGate, who: Tenant) -> Admission:
    """The first admission counted in Redis again, polled within the contract's bound."""
    async with asyncio.timeout(_RECOVERY_S):
        while True:
            try:
                admission = await gate.admit(who, cache_key=None)
            except ServiceUnavailable:
                admission = None
            if admission is not None and not admission.degraded:
                return admission
            await asyncio.sleep(0.05)


class TestFailClosed:
    async def test_outage_is_503_then_recovers(self, server: RedisServer, client: Redis) -> None:
        gate = RedisGate(client, default_rate_limit="60/minute", fail_open=False)
        who = tenant(daily_quota=100)
        before = await gate.admit(who, cache_key=None)
        assert before.headers["X-RateLimit-Remaining"] == "2"

        server.stop()
        for _ in range(2):  # every request during the outage, not only the first
            started = time.monotonic()
            with pytest.raises(ServiceUnavailable) as info:
                await gate.admit(who, cache_key=f"{CACHE}{uuid.uuid4().hex}")
            assert time.monotonic() - started < _PROMPTLY_S
            assert info.value.status_code == 503
            assert info.value.message == (
                "rate limiting is unavailable (Redis unreachable); try again shortly"
            )
            assert int(info.value.headers["Retry-After"]) >= 1
        # finish() during the outage logs and returns; it never raises.
        started = time.monotonic()
        await gate.finish(before, error=False, cpu_time_ms=1, wall_time_ms=1)
        assert time.monotonic() - started < _PROMPTLY_S

        server.start()  # same port, empty: counters gone, script cache empty (NOSCRIPT)
        after = await admitted_after_recovery(gate, who)  # the same gate, the same client
        assert after.headers["X-RateLimit-Remaining"] == "2"
        await gate.admit(who, cache_key=None)
        await gate.admit(who, cache_key=None)
        with pytest.raises(TooManyRequests):
            await gate.admit(who, cache_key=None)

    async def test_hung_redis_is_503_not_a_hang(self, server: RedisServer, client: Redis) -> None:
        """A Redis that accepts but never answers (paused, or a dead network path)."""
        gate = RedisGate(client, default_rate_limit="60/minute")
        who = tenant()
        await gate.admit(who, cache_key=None)
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(ServiceUnavailable):
                await gate.admit(who, cache_key=None)
            assert time.monotonic() - started < _PROMPTLY_S
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        admission = await admitted_after_recovery(gate, who)
        assert admission.headers["X-RateLimit-Limit"] == "3"

    async def test_usage_during_outage_is_503(self, server: RedisServer, client: Redis) -> None:
        outage = RedisOutage(client)
        gate = RedisGate(client, default_rate_limit="60/minute", outage=outage)
        server.stop()
        with pytest.raises(ServiceUnavailable):
            await gate.usage("acme")
        cache = RedisCacheStore(client, outage=outage)
        assert await cache.read(f"{CACHE}x") is None  # a read is only a miss
        await cache.write(f"{CACHE}x", b"x", 10)  # and a store is only lost


class TestFailOpen:
    async def test_outage_serves_unlimited_then_recovers(
        self, server: RedisServer, client: Redis, caplog: pytest.LogCaptureFixture
    ) -> None:
        gate = RedisGate(client, default_rate_limit="60/minute", fail_open=True)
        who = tenant(max_concurrency=1)
        await gate.admit(who, cache_key=None)

        server.stop()
        for _ in range(5):  # past the limit of 3 and the cap of 1: nothing is counted
            started = time.monotonic()
            admission = await gate.admit(who, cache_key=f"{CACHE}{uuid.uuid4().hex}")
            assert time.monotonic() - started < _PROMPTLY_S
            assert admission.headers == {}
            assert admission.cached is None  # the cache is skipped
            assert admission.lease is None
            assert admission.degraded
            started = time.monotonic()
            await gate.finish(admission, error=False, cpu_time_ms=1, wall_time_ms=1)
            assert time.monotonic() - started < 0.1  # nothing to add, no second wait on Redis

        server.start()
        admission = await admitted_after_recovery(gate, who)
        assert admission.headers["X-RateLimit-Remaining"] == "2"  # a fresh Redis, fresh counts


class TestAuthFailuresDuringOutage:
    async def test_fails_open(self, server: RedisServer, client: Redis) -> None:
        limiter = AuthFailureLimiter(
            settings=Settings(auth_failure_rate_limit="2/minute"), redis=client
        )
        server.stop()
        for _ in range(4):
            started = time.monotonic()
            limiter.check("203.0.113.9")
            await limiter.failed("203.0.113.9")
            assert time.monotonic() - started < _PROMPTLY_S
        limiter.check("203.0.113.9")  # never blocked: nothing could be counted
        server.start()
        # Counted again once the outage is over (within the contract's 5 s): blocked after 2.
        blocked = False
        async with asyncio.timeout(_RECOVERY_S):
            while not blocked:
                await limiter.failed("203.0.113.9")
                try:
                    limiter.check("203.0.113.9")
                except TooManyRequests:
                    blocked = True
                await asyncio.sleep(0.05)
        await limiter.close()
