"""Redis for the whole gateway: the one client factory, and every key name it writes.

`open_redis` makes the process's one pool (plain or through Sentinel), with the short timeouts
that turn an outage into a prompt answer; every Redis user of a process shares it (the lifespan
opens it once; the CLI opens its own). Key names are built by the functions below, one prefix per
concern; secrets never appear in a key: API keys are found by the SHA-256 of the key string.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Final

import hiredis
from redis.asyncio import Connection, ConnectionPool, Redis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelManagedSSLConnection
from redis.backoff import NoBackoff

from app.settings import RedisSentinelSettings, sentinel_address

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
