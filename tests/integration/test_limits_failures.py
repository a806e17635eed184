"""Failed authentications per client address, counted by the limits library on real Redis."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from app.errors import TooManyRequests
from app.limits import AuthFailureLimiter
from app.limits.failures import AUTH_FAILURE_PREFIX
from app.metrics import Metrics
from app.redis import open_redis
from app.settings import Settings
from tests.support import MovableClock, RedisServer


def _address() -> str:
    """A documentation address of its own per test (2001:db8::/32), so counts never mix."""
    return f"2001:db8::{uuid.uuid4().hex[:4]}"


@pytest.fixture(params=["fixed-window", "moving-window"])
async def limiters(
    request: pytest.FixtureRequest, redis_server: RedisServer
) -> AsyncIterator[tuple[AuthFailureLimiter, AuthFailureLimiter, Metrics]]:
    """Two limiters on one Redis: two gateway replicas."""
    settings = Settings(auth_failure_rate_limit="3/minute", rate_limit_strategy=request.param)
    metrics = Metrics()
    # Each replica with its own client, as each process opens its own.
    clients = [open_redis(redis_server.url, name="pgw-test-auth") for _ in range(2)]
    one = AuthFailureLimiter(settings=settings, redis=clients[0], metrics=metrics)
    two = AuthFailureLimiter(settings=settings, redis=clients[1])
    yield one, two, metrics
    await one.close()
    await two.close()
    for client in clients:
        await client.aclose()


async def test_blocks_after_the_limit(
    limiters: tuple[AuthFailureLimiter, AuthFailureLimiter, Metrics],
) -> None:
    limiter, _, metrics = limiters
    address = _address()
    for _ in range(3):
        limiter.check(address)  # still allowed to try
        await limiter.failed(address)
    with pytest.raises(TooManyRequests) as info:
        limiter.check(address)
    assert info.value.message == (
        "too many failed authentications from this address; try again later"
    )
    assert 1 <= int(info.value.headers["Retry-After"]) <= 60
    assert metrics.rejected.labels(reason="rate_limit")._value.get() == 1
    limiter.check(_address())  # another address is not affected


async def test_replicas_share_the_count(
    limiters: tuple[AuthFailureLimiter, AuthFailureLimiter, Metrics],
) -> None:
    one, two, _ = limiters
    address = _address()
    await one.failed(address)
    await one.failed(address)
    await two.failed(address)  # the third failure anywhere exhausts the shared window
    with pytest.raises(TooManyRequests):
        two.check(address)
    # The other replica learns at its own next failure from that address.
    one.check(address)
    await one.failed(address)
    with pytest.raises(TooManyRequests):
        one.check(address)


async def test_keys_live_under_the_rate_limit_prefix(
    limiters: tuple[AuthFailureLimiter, AuthFailureLimiter, Metrics], redis_server: RedisServer
) -> None:
    limiter, _, _ = limiters
    address = _address()
    await limiter.failed(address)
    client = Redis.from_url(redis_server.url)
    keys = [k.decode() async for k in client.scan_iter(match=f"{AUTH_FAILURE_PREFIX}:*{address}*")]
    await client.aclose()
    assert len(keys) == 1
    assert keys[0].endswith(f"/{address}/3/1/minute")


async def test_in_process_storage() -> None:
    limiter = AuthFailureLimiter(settings=Settings(auth_failure_rate_limit="2/minute"))
    address = "198.51.100.7"
    await limiter.failed(address)
    limiter.check(address)
    await limiter.failed(address)
    with pytest.raises(TooManyRequests):
        limiter.check(address)
    await limiter.close()


@pytest.mark.parametrize("strategy", ["fixed-window", "moving-window"])
async def test_in_process_block_ends_with_its_window(strategy: str) -> None:
    clock = MovableClock()
    settings = Settings(auth_failure_rate_limit="2/minute", rate_limit_strategy=strategy)
    limiter = AuthFailureLimiter(settings=settings, clock=clock)
    address = "198.51.100.8"
    await limiter.failed(address)
    await limiter.failed(address)
    with pytest.raises(TooManyRequests) as info:
        limiter.check(address)
    assert info.value.headers["Retry-After"] == "60"
    clock.advance(59)
    with pytest.raises(TooManyRequests):
        limiter.check(address)
    clock.advance(1.5)  # the minute is over: the address may try again, and is counted afresh
    limiter.check(address)
    await limiter.failed(address)
    limiter.check(address)
    await limiter.failed(address)
    with pytest.raises(TooManyRequests):
        limiter.check(address)
    await limiter.close()
