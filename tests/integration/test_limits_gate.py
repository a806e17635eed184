"""The Redis gate against a real redis-server: exactness across processes, quota, leases, usage."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from redis.asyncio import Redis

from app.cache.store import RedisCacheStore
from app.errors import TooManyRequests
from app.limits import Admission, RedisGate
from app.limits.gate import Strategy, windows_for
from app.metrics import Metrics
from app.redis import CACHE, CONCURRENCY, QUOTA, rate_limit_window
from app.redis_outage import RedisOutage
from app.tenancy.models import Tenant
from tests.support import MovableClock, RedisServer, until_expired


def _client(url: str) -> Redis:
    # Generous timeouts: these tests are about counting, and 60 connections opened at once on a
    # loaded 2-core CI machine can take longer than the app's outage-detecting 0.5 s (the
    # outage behaviour has its own tests, in test_limits_outage.py).
    return Redis.from_url(url, socket_connect_timeout=5.0, socket_timeout=5.0)


@pytest.fixture
async def other_redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """A second, independent client: what a second gateway process would hold."""
    client = _client(redis_server.url)
    yield client
    await client.aclose()


def tenant(**fields: Any) -> Tenant:
    """A tenant of its own per test, so tests never share a count on the shared Redis."""
    return Tenant(id=f"t{uuid.uuid4().hex[:16]}", **fields)


def gate(redis: Redis, strategy: Strategy = "fixed-window", **kw: Any) -> RedisGate:
    kw.setdefault("deadline_s", 10.0)
    return RedisGate(redis, default_rate_limit="60/minute", strategy=strategy, **kw)


async def _counter(redis: Redis, key: str) -> int:
    value = await redis.get(key)
    return int(value) if value is not None else 0


def cache_key() -> str:
    return f"{CACHE}{uuid.uuid4().hex}"


async def admit_all(
    gates: list[RedisGate], who: Tenant, n: int, **kw: Any
) -> tuple[list[Admission], list[TooManyRequests]]:
    """n concurrent admits spread over the gates; the admitted and the refused."""
    results = await asyncio.gather(
        *(gates[i % len(gates)].admit(who, cache_key=None, **kw) for i in range(n)),
        return_exceptions=True,
    )
    admitted = [r for r in results if isinstance(r, Admission)]
    refused = [r for r in results if isinstance(r, TooManyRequests)]
    assert len(admitted) + len(refused) == n, [r for r in results if isinstance(r, Exception)]
    return admitted, refused


class TestExactness:
    @pytest.mark.parametrize("strategy", ["fixed-window", "moving-window"])
    async def test_two_processes_admit_exactly_the_limit(
        self, redis: Redis, other_redis: Redis, strategy: Strategy
    ) -> None:
        who = tenant(rate_limit="20/minute")
        metrics = [Metrics(), Metrics()]
        gates = [
            gate(redis, strategy, metrics=metrics[0]),
            gate(other_redis, strategy, metrics=metrics[1]),
        ]
        admitted, refused = await admit_all(gates, who, 60)
        assert len(admitted) == 20
        assert len(refused) == 40
        # Each admitted answer saw its own place in the count: 19, 18, ... 0, no repeats.
        remaining = sorted(int(a.headers["X-RateLimit-Remaining"]) for a in admitted)
        assert remaining == list(range(20))
        assert {a.headers["X-RateLimit-Limit"] for a in admitted} == {"20"}
        for exc in refused:
            assert exc.status_code == 429
            assert exc.message == "rate limit exceeded: 20 per 1 minute"
            assert exc.headers["X-RateLimit-Remaining"] == "0"
            assert exc.headers["X-RateLimit-Limit"] == "20"
            assert 1 <= int(exc.headers["Retry-After"]) <= 60
            assert re.fullmatch(r'"default";r=0;t=\d+', exc.headers["RateLimit"])
        # Each process counts the refusals it answered.
        counted = sum(m.rejected.labels(reason="rate_limit")._value.get() for m in metrics)
        assert counted == 40

    async def test_headers_count_down(self, redis: Redis) -> None:
        who = tenant(rate_limit="60/minute")
        first = await gate(redis).admit(who, cache_key=None)
        second = await gate(redis).admit(who, cache_key=None)
        h = first.headers
        assert h["X-RateLimit-Limit"] == "60"
        assert h["X-RateLimit-Remaining"] == "59"
        assert h["RateLimit-Policy"] == '"default";q=60;w=60'
        assert re.fullmatch(r'"default";r=59;t=(\d+)', h["RateLimit"])
        t = int(h["RateLimit"].rsplit("=", 1)[1])
        assert 59 <= t <= 60
        reset = int(h["X-RateLimit-Reset"])
        now = datetime.now(UTC).timestamp()
        assert now < reset <= now + 61
        assert second.headers["X-RateLimit-Remaining"] == "58"
        assert second.headers["X-RateLimit-Reset"] == h["X-RateLimit-Reset"]  # same fixed window

    @pytest.mark.parametrize("strategy", ["fixed-window", "moving-window"])
    async def test_several_windows(self, redis: Redis, strategy: Strategy) -> None:
        who = tenant(rate_limit="3/second;5/minute")
        clock = MovableClock()
        g = gate(redis, strategy, clock=clock)
        admitted, refused = await admit_all([g], who, 6)
        assert len(admitted) == 3
        assert {e.message for e in refused} == {"rate limit exceeded: 3 per 1 second"}
        policy = admitted[0].headers["RateLimit-Policy"]
        assert policy == '"1second";q=3;w=1, "1minute";q=5;w=60'
        # Closest to exhaustion is the second window: after 3 hits, 0 of 3 left there.
        last = min(admitted, key=lambda a: int(a.headers["X-RateLimit-Remaining"]))
        assert last.headers["X-RateLimit-Limit"] == "3"
        assert last.headers["RateLimit"].startswith('"1second";r=0;')

        # The one-second window rolls over: a fixed window when its key expires in Redis, a
        # moving one when its entries are older than a second.
        if strategy == "fixed-window":
            second = windows_for(who.rate_limit or "", strategy)[0]
            await until_expired(redis, rate_limit_window(second.key(who.id)), within=5)
        else:
            clock.advance(1.2)
        # The refusals consumed nothing: the minute window still has 2 of 5.
        admitted, refused = await admit_all([g], who, 4)
        assert len(admitted) == 2
        assert {e.message for e in refused} == {"rate limit exceeded: 5 per 1 minute"}
        for exc in refused:
            assert exc.headers["X-RateLimit-Limit"] == "5"
            assert exc.headers["X-RateLimit-Remaining"] == "0"
            assert int(exc.headers["Retry-After"]) > 1  # waits for the minute, not the second

    async def test_moving_window_slides(self, redis: Redis) -> None:
        who = tenant(rate_limit="2/second")
        clock = MovableClock()
        g = gate(redis, "moving-window", clock=clock)
        await g.admit(who, cache_key=None)
        clock.advance(0.6)
        await g.admit(who, cache_key=None)
        with pytest.raises(TooManyRequests):
            await g.admit(who, cache_key=None)
        clock.advance(0.55)  # the first entry left the window, the second is still in it
        await g.admit(who, cache_key=None)
        with pytest.raises(TooManyRequests):
            await g.admit(who, cache_key=None)

    async def test_default_limit_applies_when_tenant_has_none(self, redis: Redis) -> None:
        g = RedisGate(redis, default_rate_limit="2/minute")
        who = tenant()
        await g.admit(who, cache_key=None)
        await g.admit(who, cache_key=None)
        with pytest.raises(TooManyRequests, match="2 per 1 minute"):
            await g.admit(who, cache_key=None)


class TestQuota:
    async def test_quota_refuses_and_names_reset(self, redis: Redis) -> None:
        who = tenant(rate_limit="100/minute", daily_quota=3)
        metrics = Metrics()
        g = gate(redis, metrics=metrics)
        for _ in range(3):
            await g.admit(who, cache_key=None)
        tomorrow = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%d")
        for _ in range(3):
            with pytest.raises(TooManyRequests) as info:
                await g.admit(who, cache_key=None)
            exc = info.value
            assert exc.message == (
                f"daily quota of 3 executions reached; it resets at {tomorrow}T00:00:00Z"
            )
            assert exc.headers["X-RateLimit-Remaining"] == "0"
            assert exc.headers["RateLimit"].startswith('"daily";r=0;')
            assert '"daily";q=3;w=86400' in exc.headers["RateLimit-Policy"]
            assert 1 <= int(exc.headers["Retry-After"]) <= 86_400
        assert metrics.rejected.labels(reason="quota")._value.get() == 3
        day = datetime.now(UTC).strftime("%Y-%m-%d")
        assert await _counter(redis, f"{QUOTA}{who.id}:{day}") == 3  # refusals ate nothing
        # The counter outlives its day by an hour (garbage collection; the key names the day).
        midnight = datetime.strptime(tomorrow, "%Y-%m-%d").replace(tzinfo=UTC)
        to_midnight = midnight.timestamp() - datetime.now(UTC).timestamp()
        ttl = await redis.ttl(f"{QUOTA}{who.id}:{day}")
        assert abs(ttl - (to_midnight + 3_600)) < 5

    async def test_rate_limited_request_does_not_eat_quota(self, redis: Redis) -> None:
        who = tenant(rate_limit="2/minute", daily_quota=10)
        g = gate(redis)
        admitted, refused = await admit_all([g], who, 5)
        assert (len(admitted), len(refused)) == (2, 3)
        day = datetime.now(UTC).strftime("%Y-%m-%d")
        assert await _counter(redis, f"{QUOTA}{who.id}:{day}") == 2


class TestConcurrency:
    async def test_cap_and_release(self, redis: Redis) -> None:
        who = tenant(rate_limit="100/minute", max_concurrency=2)
        metrics = Metrics()
        g = gate(redis, metrics=metrics)
        a = await g.admit(who, cache_key=None)
        b = await g.admit(who, cache_key=None)
        assert a.lease is not None
        assert b.lease is not None
        assert a.lease != b.lease
        with pytest.raises(TooManyRequests) as info:
            await g.admit(who, cache_key=None)
        assert info.value.message == "concurrency limit of 2 executions in flight reached"
        assert info.value.headers["Retry-After"] == "1"
        assert metrics.rejected.labels(reason="concurrency")._value.get() == 1
        await g.finish(a, error=False, cpu_time_ms=1, wall_time_ms=1)
        c = await g.admit(who, cache_key=None)
        assert c.lease is not None
        assert await redis.zcard(f"{CONCURRENCY}{who.id}") == 2

    async def test_concurrency_refusal_consumes_no_rate_limit(self, redis: Redis) -> None:
        who = tenant(rate_limit="3/minute", max_concurrency=1)
        g = gate(redis)
        a = await g.admit(who, cache_key=None)
        with pytest.raises(TooManyRequests, match="concurrency"):
            await g.admit(who, cache_key=None)
        await g.finish(a, error=False, cpu_time_ms=0, wall_time_ms=0)
        b = await g.admit(who, cache_key=None)
        assert b.headers["X-RateLimit-Remaining"] == "1"  # 2 of 3 used, not 3

    async def test_expired_lease_of_a_dead_replica_is_pruned(self, redis: Redis) -> None:
        who = tenant(rate_limit="100/minute", max_concurrency=2)
        clock = MovableClock()  # the replicas' shared clock (Redis's, in production)
        dead = gate(redis, clock=clock)  # a replica that takes leases and dies before finishing
        await dead.admit(who, cache_key=None, lease_ttl_ms=30_000)
        await dead.admit(who, cache_key=None, lease_ttl_ms=30_000)
        alive = gate(redis, clock=clock)
        with pytest.raises(TooManyRequests):
            await alive.admit(who, cache_key=None)
        clock.advance(30.25)  # the leases' expiry passed; their zset outlives them in Redis
        admission = await alive.admit(who, cache_key=None)
        assert admission.lease is not None
        assert await redis.zcard(f"{CONCURRENCY}{who.id}") == 1

    async def test_lease_set_expires_with_its_longest_lease(self, redis: Redis) -> None:
        who = tenant(rate_limit="100/minute", max_concurrency=5)
        g = gate(redis)
        await g.admit(who, cache_key=None, lease_ttl_ms=30_000)
        await g.admit(who, cache_key=None, lease_ttl_ms=1_000)  # must not shorten the key
        assert 25_000 < await redis.pttl(f"{CONCURRENCY}{who.id}") <= 30_000


class TestCache:
    async def test_hit_returns_bytes_counts_and_takes_no_lease(self, redis: Redis) -> None:
        who = tenant(rate_limit="100/minute", max_concurrency=1, daily_quota=1000)
        g = gate(redis)
        key = cache_key()
        body = b'{"run":{"stdout":"hi\\n"}}'
        await redis.set(key, body, ex=60)
        holder = await g.admit(who, cache_key=None)  # holds the only slot
        hit = await g.admit(who, cache_key=key)
        assert hit.cached == body
        assert hit.lease is None
        assert hit.headers["X-RateLimit-Remaining"] == "98"  # a hit counts against the limit
        miss = cache_key()
        with pytest.raises(TooManyRequests, match="concurrency"):
            await g.admit(who, cache_key=miss)  # a miss needs the slot
        await g.finish(holder, error=False, cpu_time_ms=0, wall_time_ms=0)
        admission = await g.admit(who, cache_key=miss)
        assert admission.cached is None
        assert admission.lease is not None
        [today] = await g.usage(who.id, days=1)
        assert today["executions"] == 3
        assert today["cache_hits"] == 1
        assert today["rate_limited"] == 1
        day = datetime.now(UTC).strftime("%Y-%m-%d")
        assert await _counter(redis, f"{QUOTA}{who.id}:{day}") == 3  # the hit used quota too

    async def test_admit_reads_what_the_cache_store_wrote(self, redis: Redis) -> None:
        who = tenant()
        g = gate(redis)
        cache = RedisCacheStore(redis, outage=RedisOutage(redis), deadline_s=10.0)
        key = cache_key()
        admission = await g.admit(who, cache_key=key)
        assert admission.cached is None
        await g.finish(admission, error=False, cpu_time_ms=1, wall_time_ms=2)
        await cache.write(key, b"x", 30)
        assert await cache.read(key) == b"x"
        assert 0 < await redis.ttl(key) <= 30
        await cache.write(key, b"y", 30)
        assert (await g.admit(who, cache_key=key)).cached == b"y"
        assert await cache.read(cache_key()) is None


class TestUsage:
    async def test_figures_after_a_known_sequence(self, redis: Redis) -> None:
        who = tenant(rate_limit="3/minute")
        g = gate(redis)
        key = cache_key()
        await redis.set(key, b"{}", ex=60)
        a = await g.admit(who, cache_key=cache_key())  # a miss
        b = await g.admit(who, cache_key=key)  # a hit
        c = await g.admit(who, cache_key=None)
        for _ in range(2):
            with pytest.raises(TooManyRequests):
                await g.admit(who, cache_key=None)
        await g.finish(a, error=True, cpu_time_ms=12.5, wall_time_ms=30)
        await g.finish(b, error=False, cpu_time_ms=0, wall_time_ms=0)
        await g.finish(c, error=False, cpu_time_ms=7.5, wall_time_ms=10.25)
        report = await g.usage(who.id, days=3)
        now = datetime.now(UTC)
        dates = [(now - timedelta(days=n)).strftime("%Y-%m-%d") for n in range(3)]
        zero = dict.fromkeys(
            ("executions", "cache_hits", "rate_limited", "errors", "cpu_time_ms", "wall_time_ms"),
            0,
        )
        assert report == [
            {
                "date": dates[0],
                "executions": 3,
                "cache_hits": 1,
                "rate_limited": 2,
                "errors": 1,
                "cpu_time_ms": 20,
                "wall_time_ms": 40.25,
            },
            {"date": dates[1], **zero},
            {"date": dates[2], **zero},
        ]
        assert len(await g.usage(who.id)) == 7
        with pytest.raises(ValueError, match="days"):
            await g.usage(who.id, days=40)

    async def test_usage_expires_after_32_days(self, redis: Redis) -> None:
        who = tenant()
        g = gate(redis)
        admission = await g.admit(who, cache_key=None)
        from app.redis import USAGE

        ttl = await redis.ttl(f"{USAGE}{who.id}:{admission.day}")
        assert 31 * 86_400 < ttl <= 32 * 86_400


class TestRoundTrips:
    """The hot path's budget (issue 8): one admit is ONE command on the wire, an EVALSHA."""

    @pytest.fixture
    async def private_redis(self) -> AsyncIterator[RedisServer]:
        server = RedisServer()  # nobody else talks to it, so MONITOR sees only this test
        server.start()
        yield server
        server.stop()

    async def _commands_on_the_wire(self, server: RedisServer, work: Any) -> list[str]:
        """Every top-level command the gate sent while `work` ran (not those inside scripts)."""
        watcher = Redis.from_url(server.url)
        marker = Redis.from_url(server.url)
        await marker.ping()  # its connection handshake must not land inside the window
        seen: list[str] = []
        async with watcher.monitor() as monitor:
            await work()
            await marker.echo("end-of-test")
            async for event in monitor.listen():
                command = str(event["command"])
                if command.startswith("ECHO") and "end-of-test" in command:
                    break
                if event.get("client_type") != "lua":
                    seen.append(command.split(" ", 1)[0].upper())
        await watcher.aclose()
        await marker.aclose()
        return seen

    async def test_one_evalsha_per_admit(self, private_redis: RedisServer) -> None:
        redis = Redis.from_url(private_redis.url, health_check_interval=15)
        g = gate(redis)
        who = tenant(rate_limit="100/minute", daily_quota=100, max_concurrency=5)
        key = cache_key()
        await redis.set(key, b"cached", ex=60)
        await g.admit(who, cache_key=key)  # warm up: connection handshake, script load

        async def work() -> None:
            hit = await g.admit(who, cache_key=key)
            assert hit.cached == b"cached"
            miss = await g.admit(who, cache_key=cache_key())
            assert miss.lease is not None

        assert await self._commands_on_the_wire(private_redis, work) == ["EVALSHA", "EVALSHA"]
        await redis.aclose()

    async def test_script_flush_is_recovered(self, redis: Redis) -> None:
        g = gate(redis)
        who = tenant()
        await g.admit(who, cache_key=None)
        await redis.script_flush()  # what a restarted Redis looks like to the script cache
        admission = await g.admit(who, cache_key=None)
        assert admission.headers["X-RateLimit-Remaining"] == "58"
