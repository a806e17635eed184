"""Failed authentications per client address, so a key-guessing loop gets 429s.

Counted with the `limits` library for real (its async Redis storage on redis-py, or its memory
storage on the limiter's clock, `ClockedMemoryStorage`), with `GATEWAY_AUTH_FAILURE_RATE_LIMIT`.
Only failures touch Redis: `check()` reads an in-process list of addresses found over the limit,
consulted only for a key that failed, so a valid key is never refused for other failures from its
address and pays no round trip for it; a request with no key at all is not an attempt. With
several replicas, each learns of a blocked address at its own next failure from it, so a guessing
loop gets at most one more try per replica per window.
Redis errors fail open: authentication must keep working when Redis does not. They are reported
to the process's `RedisOutage`, which logs the outage once at each end; while it lasts, failures
are not sent to Redis at all.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence
from typing import Final

import structlog
from limits import RateLimitItem, parse_many
from limits.aio.storage import RedisStorage, Storage
from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter, RateLimiter
from redis.asyncio import Redis

from app.clock import SYSTEM_CLOCK, Clock
from app.errors import TooManyRequests
from app.limits.gate import retry_after
from app.limits.memory_gate import ClockedMemoryStorage
from app.metrics import Metrics
from app.redis import rate_limit_window
from app.redis_outage import REDIS_DEADLINE_S, RedisOutage
from app.settings import Settings

__all__ = ["AUTH_FAILURE_PREFIX", "AuthFailureLimiter", "client_address"]

log = structlog.get_logger(__name__)

# pgw:rl:auth:LIMITER/<address>/20/1/minute (the limits library's key under our prefix)
AUTH_FAILURE_PREFIX: Final = rate_limit_window("auth")
_MAX_BLOCKED: Final = 100_000  # addresses remembered; beyond it the expired ones are dropped

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class AuthFailureLimiter:
    """`check(addr)` before authenticating (sync, no I/O); `await failed(addr)` on a failure."""

    def __init__(
        self,
        *,
        settings: Settings,
        redis: Redis | None = None,
        metrics: Metrics | None = None,
        outage: RedisOutage | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._owns_outage = outage is None
        self._now = clock.wall
        self._items: list[RateLimitItem] = parse_many(settings.auth_failure_rate_limit)
        self._metrics = metrics
        self._redis = redis
        storage: Storage
        if redis is None:
            storage = ClockedMemoryStorage(clock)
        else:
            # The process's one pool (app.redis.open_redis: short timeouts, one immediate
            # retry), so an outage holds a failed login no longer than any other Redis call.
            storage = RedisStorage(
                "async+redis://",  # unused: the library's client runs on the pool below
                implementation="redispy",
                key_prefix=AUTH_FAILURE_PREFIX,
                connection_pool=redis.connection_pool,  # type: ignore[arg-type]  # to redis-py
            )
        # On its own (tests), an outage state of its own.
        self._outage = outage or RedisOutage(redis)
        self._limiter: RateLimiter = (
            MovingWindowRateLimiter(storage)
            if settings.rate_limit_strategy == "moving-window"
            else FixedWindowRateLimiter(storage)
        )
        self._blocked: dict[str, float] = {}  # address -> epoch seconds when it may try again

    def check(self, address: str) -> None:
        """Raise 429 if `address` has failed too often lately (no I/O: the hot path)."""
        until = self._blocked.get(address)
        if until is None:
            return
        now = self._now()
        if until <= now:
            del self._blocked[address]
            return
        if self._metrics is not None:
            self._metrics.rejected.labels(reason="rate_limit").inc()
        raise TooManyRequests(
            "too many failed authentications from this address; try again later",
            headers={"Retry-After": retry_after(until - now)},
        )

    async def failed(self, address: str) -> None:
        """Count one failed authentication; past the limit, `check(address)` starts refusing."""
        if self._redis is not None and self._outage.active:
            return  # fail open without waiting on Redis: the outage is logged already
        try:
            async with asyncio.timeout(REDIS_DEADLINE_S):
                for item in self._items:
                    await self._limiter.hit(item, address)
                until = 0.0
                for item in self._items:
                    # Exhausted now means the next attempt would be over: block it from here.
                    if not await self._limiter.test(item, address):
                        stats = await self._limiter.get_window_stats(item, address)
                        until = max(until, stats.reset_time)
        except Exception as exc:  # any storage failure: fail open, auth must keep working
            self._outage.failed(exc, by="auth_failures")
            return
        self._outage.succeeded()
        if until:
            self._remember(address, until)

    def _remember(self, address: str, until: float) -> None:
        if len(self._blocked) >= _MAX_BLOCKED:
            now = self._now()
            self._blocked = {a: t for a, t in self._blocked.items() if t > now}
        self._blocked[address] = until

    async def close(self) -> None:
        if self._owns_outage:
            await self._outage.close()
        # The pool is the process's: its owner closes it.


def _parse_ip(text: str) -> Address | None:
    """An address from X-Forwarded-For, accepting `1.2.3.4:80` and `[::1]:80` as proxies write."""
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else text
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; match them against IPv4 networks.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: Address, networks: Sequence[Network]) -> bool:
    return any(address in network for network in networks)


def client_address(
    scope_client_host: str | None,
    x_forwarded_for: str | None,
    trusted_proxies: Sequence[Network],
) -> str:
    """The client's address: the peer, unless the peer is a trusted proxy.

    Behind trusted proxies, X-Forwarded-For is read from the right (each proxy appends the
    address it saw), skipping trusted hops; the first untrusted one is the client. Anything left
    of it was written by the client and could be forged, so it is never used.
    """
    if not scope_client_host:
        return "unknown"
    if not trusted_proxies or not x_forwarded_for:
        return scope_client_host  # the common case, without parsing an address per request
    peer = _parse_ip(scope_client_host)
    if peer is None or not x_forwarded_for or not _trusted(peer, trusted_proxies):
        return scope_client_host
    last = peer
    for hop in reversed(x_forwarded_for.split(",")):
        address = _parse_ip(hop)
        if address is None:
            break  # garbage where a proxy's entry should be: trust no further than the last hop
        if not _trusted(address, trusted_proxies):
            return str(address)
        last = address
    # Every hop is trusted (or the header ends in garbage): the farthest proxy we could verify.
    return str(last)
