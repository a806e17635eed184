"""Redis for the whole gateway: the one client factory, every key name, the pub/sub helper.

`open_redis` makes the process's one pool (plain or through Sentinel), with the short timeouts
that turn an outage into a prompt answer; every Redis user of a process shares it (the lifespan
opens it once; the CLI opens its own). Key names are built by the functions below, one prefix per
concern; secrets never appear in a key: API keys are found by the SHA-256 of the key string.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import hiredis
import structlog
from redis.asyncio import Connection, ConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelManagedSSLConnection
from redis.backoff import NoBackoff

from app.settings import RedisSentinelSettings, sentinel_address

log = structlog.get_logger(__name__)

__all__ = [
    "BROWSER_KEYS",
    "CACHE",
    "CHANNEL_INVALIDATE",
    "CONCURRENCY",
    "FLIGHT",
    "FLIGHT_PATTERN",
    "KEY",
    "KEY_BY_ID",
    "QUOTA",
    "RATE_LIMIT",
    "TENANT",
    "TENANT_INDEX",
    "TENANT_KEYS",
    "USAGE",
    "Subscription",
    "cache_entry",
    "concurrency_leases",
    "flight_lock",
    "key_by_id",
    "key_record",
    "open_redis",
    "quota_counter",
    "rate_limit_window",
    "tenant_index",
    "tenant_keys",
    "tenant_record",
    "usage_hash",
]

ROOT: Final = "pgw:"
TENANT: Final = ROOT + "tenant:"  # pgw:tenant:<id> -> tenant JSON
TENANT_INDEX: Final = ROOT + "tenants"  # set of tenant ids
TENANT_KEYS: Final = ROOT + "tenant-keys:"  # pgw:tenant-keys:<tenant> -> set of key ids
KEY: Final = ROOT + "key:"  # pgw:key:<sha256 of the key> -> key JSON (never the key)
KEY_BY_ID: Final = ROOT + "keyid:"  # pgw:keyid:<key id> -> sha256 of the key
RATE_LIMIT: Final = ROOT + "rl:"  # pgw:rl:<tenant>/<limit>... -> window counters
QUOTA: Final = ROOT + "quota:"  # pgw:quota:<tenant>:<YYYY-MM-DD> -> executions that day
CONCURRENCY: Final = ROOT + "conc:"  # pgw:conc:<tenant> -> zset of leases scored by expiry
USAGE: Final = ROOT + "usage:"  # pgw:usage:<tenant>:<YYYY-MM-DD> -> hash of counters
CACHE: Final = ROOT + "cache:"  # pgw:cache:<sha256 of the effective request> -> answer bytes
FLIGHT: Final = ROOT + "flight:"  # pgw:flight:<cache digest> -> single-flight lock
CHANNEL_INVALIDATE: Final = ROOT + "invalidate"  # pub/sub: key and tenant changes
# Browser keys: pgw:browser-keys -> hash of <sha256 of the key> -> {"origins", "expires_at"}
BROWSER_KEYS: Final = ROOT + "browser-keys"
FLIGHT_PATTERN: Final = FLIGHT + "*"  # PSUBSCRIBE: every flight's wake-up channel
_PUBSUB_POLL_S: Final = 1.0  # a subscription without pings still looks at `close` this often


def tenant_record(tenant_id: str) -> str:
    return TENANT + tenant_id


def tenant_index() -> str:
    return TENANT_INDEX


def tenant_keys(tenant_id: str) -> str:
    return TENANT_KEYS + tenant_id


def key_record(key_hash: str) -> str:
    """The key's record, under the SHA-256 of the key (never the key itself)."""
    return KEY + key_hash


def key_by_id(key_id: str) -> str:
    return KEY_BY_ID + key_id


def rate_limit_window(window_key: str) -> str:
    """A window's counter; `window_key` is the limits library's `<strategy>/<tenant>/...`."""
    return RATE_LIMIT + window_key


def quota_counter(tenant_id: str, day: str) -> str:
    return f"{QUOTA}{tenant_id}:{day}"


def concurrency_leases(tenant_id: str) -> str:
    return CONCURRENCY + tenant_id


def usage_hash(tenant_id: str, day: str) -> str:
    return f"{USAGE}{tenant_id}:{day}"


def cache_entry(digest: str) -> str:
    return CACHE + digest


def flight_lock(digest: str) -> str:
    """The flight's lock, and (channels are another namespace) its wake-up channel."""
    return FLIGHT + digest


# --------------------------------------------------------------------------- the client


class _HiredisPackingConnection(Connection):
    """redis-py's asyncio connection packs commands in Python (its sync one uses hiredis):
    a fifth of a cache hit's CPU went to packing the gate's script call (bench/, cProfile)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        command = args[0]
        if isinstance(command, str) and " " in command:  # "SCRIPT LOAD": words go separately
            args = (*command.split(), *args[1:])
        return [hiredis.pack_command(args)]


class _SentinelRedis(Redis):
    """A client of the Sentinel's current master that also closes its connections to the
    sentinels when it is closed (redis-py leaves those open)."""

    sentinels: list[Redis]

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        for sentinel in self.sentinels:
            await sentinel.aclose()


def open_redis(
    url: str,
    *,
    name: str,
    sentinels: Sequence[str] | None = None,
    sentinel_master: str | None = None,
    sentinel_password: str | None = None,
    connect_timeout_s: float = 0.5,
    timeout_s: float = 1.0,
) -> Redis:
    """One pool per process, short timeouts so an outage is answered quickly, never hung on.

    With Redis Sentinel (`sentinels` as `host:port`, or GATEWAY_REDIS_SENTINELS when the caller
    passes none) the pool asks the sentinels for the current master of `sentinel_master` and
    follows a failover; `url` then gives only the database, the master's credentials and TLS.
    `name` and the pid name the connections in `CLIENT LIST`.
    """
    timeouts: dict[str, Any] = {
        "socket_connect_timeout": connect_timeout_s,
        "socket_timeout": timeout_s,
        "health_check_interval": 15,
        "retry": Retry(NoBackoff(), 1),
        "client_name": f"{name}-{os.getpid()}",
    }
    if sentinels is None:
        from_env = RedisSentinelSettings()
        sentinels = from_env.redis_sentinels
        sentinel_master = sentinel_master or from_env.redis_sentinel_master
        if sentinel_password is None and from_env.redis_sentinel_password is not None:
            sentinel_password = from_env.redis_sentinel_password.get_secret_value()
    if sentinels:
        target = parse_url(url)
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            [sentinel_address(entry) for entry in sentinels],
            sentinel_kwargs={
                "password": sentinel_password,
                "socket_connect_timeout": 0.5,
                "socket_timeout": 1.0,
            },
        )
        if url.startswith("rediss"):
            timeouts["connection_class"] = SentinelManagedSSLConnection
        client: _SentinelRedis = sentinel.master_for(
            sentinel_master or "mymaster",
            redis_class=_SentinelRedis,
            db=target.get("db", 0),
            username=target.get("username"),
            password=target.get("password"),
            max_connections=2048,
            **timeouts,
        )
        client.sentinels = list(sentinel.sentinels)
        return client
    # A plain pool: BlockingConnectionPool's condition and timeout per command cost a fifth of
    # a Redis call's CPU (bench/, cProfile); a ceiling this high is not reached in practice.
    fast = {"connection_class": _HiredisPackingConnection} if url.startswith("redis://") else {}
    pool = ConnectionPool.from_url(url, **fast, max_connections=2048, **timeouts)
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes both


# --------------------------------------------------------------------------- pub/sub


class Subscription:
    """One pub/sub subscription a process keeps alive: re-made after any failure, its loss and
    its return logged once each, not once per attempt.

    `on_subscribed` runs at every (re)subscription (what was published meanwhile is lost: its
    owner reads again what it needs), `on_message(channel, data)` for every message. With
    `ping_interval_s`, the connection is pinged, so `heard_within` tells a live subscription from
    a deaf one (a network path that went silent); without, it is polled only to see `close`.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        channel: str | None = None,
        pattern: str | None = None,
        name: str,
        on_message: Callable[[bytes | str, bytes | str], None],
        on_subscribed: Callable[[], Awaitable[None]] | None = None,
        ping_interval_s: float | None = None,
        retry_s: float,
        retry_max_s: float,
        lost_event: str,
        restored_event: str,
    ) -> None:
        self._redis = redis
        self._channel, self._pattern = channel, pattern
        self._name = name
        self._on_message, self._on_subscribed = on_message, on_subscribed
        self._ping_interval_s = ping_interval_s
        self._retry_s, self._retry_max_s = retry_s, retry_max_s
        self._lost_event, self._restored_event = lost_event, restored_event
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._subscribed = False
        self._last_heard = float("-inf")
        self._lost_logged = False
        self._delay = retry_s

    @property
    def subscribed(self) -> bool:
        """The subscription is confirmed and not lost since."""
        return self._subscribed

    def heard_within(self, seconds: float) -> bool:
        """Something (a message, a ping's answer) arrived within `seconds`."""
        return time.monotonic() - self._last_heard < seconds

    def start(self) -> None:
        """Run it, unless it runs already (again, if it ended)."""
        if self._closed or (self._task is not None and not self._task.done()):
            return
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self._name)

    async def close(self, timeout_s: float) -> bool:
        """Stop it; False when it did not stop within `timeout_s` (it is left cancelled)."""
        # The flag, not only the cancel: on Python 3.11 a cancel that lands as redis-py's read
        # timeout fires is turned into that timeout and lost, and the loop would run on.
        self._closed = True
        task, self._task = self._task, None
        if task is None:
            return True
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
        return bool(done)

    async def _run(self) -> None:
        while not self._closed:
            pubsub = self._redis.pubsub()
            try:
                if self._channel is not None:
                    await pubsub.subscribe(self._channel)
                if self._pattern is not None:
                    await pubsub.psubscribe(self._pattern)
                await self._pump(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any Redis or socket failure: subscribe again, never die
                if not self._lost_logged:
                    self._lost_logged = True
                    log.warning(self._lost_event, error=type(exc).__name__)
            finally:
                self._subscribed = False
                self._last_heard = float("-inf")
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]  # untyped in redis-py
            if not self._closed:
                await asyncio.sleep(self._delay)
                self._delay = min(self._delay * 2, self._retry_max_s)

    async def _pump(self, pubsub: PubSub) -> None:
        poll_s = self._ping_interval_s or _PUBSUB_POLL_S
        last_ping = float("-inf")
        while not self._closed:
            now = time.monotonic()
            if self._ping_interval_s is not None and now - last_ping >= self._ping_interval_s:
                await pubsub.ping()
                last_ping = now
            message = await pubsub.get_message(timeout=poll_s)
            if message is None:
                continue
            kind = message.get("type")
            kind = kind.decode() if isinstance(kind, bytes) else kind
            if kind in ("subscribe", "psubscribe"):
                self._subscribed = True
                self._delay = self._retry_s
                if self._on_subscribed is not None:
                    await self._on_subscribed()
            elif kind in ("message", "pmessage"):
                self._on_message(message["channel"], message["data"])
            self._last_heard = time.monotonic()
            if self._lost_logged:
                self._lost_logged = False
                log.info(self._restored_event)
