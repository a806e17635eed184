"""Who is calling: a presented key to its Principal, with an in-process cache of the lookups.

The hot path is one SHA-256 and one dict lookup: keys found in Redis are cached in this process,
and every change to a key or tenant is announced on `pgw:invalidate`, which drops the cached
entry here within milliseconds. While that subscription is down, cached entries are trusted for
only `_FALLBACK_TTL_SECONDS`, so a revocation still reaches this process within the contract's
2 seconds.

Freshness, the outage grace and key expiry are read from the authenticator's `Clock` (tests move
it); the subscription's liveness (`listening`) is the real time of pings answered.

While Redis itself is unreachable (the process's `RedisOutage`), nothing can be checked: a key
this process verified within `outage_seconds` keeps working from the cache, and any other key
is answered 503 (it cannot be checked), never 401 and never 500.

Browser keys: the same channel carries the origins CORS answers for. A mint publishes
`browser-key:{...}` (added to `origins`), a revoke or tenant delete `key:<sha256>` (removed);
every (re)subscribe loads the live browser keys once from `pgw:browser-keys`, so no message lost
while unsubscribed is missed, and no preflight ever reads Redis. A browser key's requests must
carry one of its origins (`app.api.deps.check_origin`), on HTTP and on the WebSocket alike.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Final

import structlog
from redis.asyncio import Redis

from app import redis as redis_keys
from app.clock import SYSTEM_CLOCK, Clock
from app.redis import Subscription
from app.redis_outage import OUTAGE_ERRORS, REDIS_DEADLINE_S, RedisOutage, RedisUnavailable
from app.tenancy.keys import hash_key
from app.tenancy.models import ApiKey, Principal, Tenant
from app.tenancy.origins import OriginIndex
from app.tenancy.store import MemoryTenantStore, TenantStore, browser_entry, parse_browser_key

__all__ = ["ADMIN_TENANT_ID", "Authenticator"]

log = structlog.get_logger(__name__)

# Not a valid tenant id (ids start with [a-z0-9]), so no real tenant can ever be mistaken for it.
ADMIN_TENANT_ID: Final = "_admin"
_CACHE_MAX_ENTRIES: Final = 10_000
# Trust a cached entry this long when invalidations may be lost: well inside the 2 s promise.
_FALLBACK_TTL_SECONDS: Final = 1.0
# How often the listener pings Redis, and how long without any answer means "deaf".
_PING_INTERVAL_SECONDS: Final = 0.5
_DEAF_AFTER_SECONDS: Final = 1.0
_RECONNECT_DELAY_SECONDS: Final = 0.5
_CLOSE_TIMEOUT_SECONDS: Final = 2.0
_START_WAIT_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class _Entry:
    key: ApiKey
    principal: Principal
    fetched_at: float  # the clock's monotonic time
    # Set when invalidations may have been missed (a resubscribe): read again before use, but
    # kept, since it is still a key this process verified (the outage grace serves it).
    stale: bool = False


def _admin_principal() -> Principal:
    tenant = Tenant.model_construct(id=ADMIN_TENANT_ID, name="GATEWAY_ADMIN_KEY")
    # Only `admin`: the bootstrap key manages tenants; executions belong to a real tenant's policy.
    return Principal(
        tenant=tenant, key_id=ADMIN_TENANT_ID, key_prefix="(admin key)", scopes=frozenset({"admin"})
    )


class Authenticator:
    """Turns a presented key into a Principal, caching lookups that Redis pub/sub invalidates."""

    def __init__(
        self,
        store: TenantStore,
        *,
        admin_key: str | None,
        redis: Redis | None,
        cache_seconds: float = 30,
        outage: RedisOutage | None = None,
        outage_seconds: float = 300,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._store = store
        self._monotonic = clock.monotonic
        self._now = clock.wall
        self._redis = redis
        self._admin_digest = hash_key(admin_key) if admin_key else None
        self._admin = _admin_principal()
        # Caching only makes sense over Redis; the in-process store is already a dict lookup,
        # and without a channel there would be nothing to invalidate a cached entry.
        self._caching = redis is not None and not isinstance(store, MemoryTenantStore)
        self._cache_seconds = cache_seconds
        self._outage = outage if outage is not None else RedisOutage(redis)
        self._outage_seconds = outage_seconds
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        # Bumped by every invalidation: a lookup that raced one must not cache what it read.
        self._generation = 0
        self._invalidations = (
            Subscription(
                redis,
                channel=redis_keys.CHANNEL_INVALIDATE,
                name="key-cache-invalidation",
                on_message=self._on_invalidation,
                on_subscribed=self._on_subscribed,
                ping_interval_s=_PING_INTERVAL_SECONDS,
                retry_s=_RECONNECT_DELAY_SECONDS,
                retry_max_s=_RECONNECT_DELAY_SECONDS,
                lost_event="key_cache_channel_lost",
                restored_event="key_cache_channel_restored",
            )
            if redis is not None and self._caching
            else None
        )
        # The live browser keys' origins: the in-process store keeps its own up to date.
        self.origins = store.origins if isinstance(store, MemoryTenantStore) else OriginIndex()

    @property
    def listening(self) -> bool:
        """True while the invalidation channel is subscribed and answering pings."""
        subscription = self._invalidations
        return subscription is not None and subscription.heard_within(_DEAF_AFTER_SECONDS)

    async def start(self) -> None:
        if self._invalidations is not None:
            self._invalidations.start()
            # Return once subscribed (or after a bound, if Redis is down): a cancel that lands
            # while redis-py is still connecting can be lost on Python 3.11, hanging shutdown.
            # Real time, not the clock's: this waits for an event, it times no window.
            deadline = time.monotonic() + _START_WAIT_SECONDS
            while not self.listening and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.005)

    async def close(self) -> None:
        if self._invalidations is not None and not await self._invalidations.close(
            _CLOSE_TIMEOUT_SECONDS
        ):
            log.warning("key_cache_listener_did_not_stop")
        self._cache.clear()

    async def principal_for(self, key: str) -> Principal | None:
        """The Principal for a presented key, or None for unknown, revoked or expired ones."""
        digest = hash_key(key)
        # Digests of equal length, compared in constant time: the secret itself is never compared.
        if self._admin_digest is not None and hmac.compare_digest(digest, self._admin_digest):
            return self._admin
        entry = self._cached(digest)
        if entry is None or not self._fresh(entry):
            entry = await self._verify(digest, entry)
        # Expiry is checked on every use, so a cached key stops working the second it expires.
        if entry is None or not entry.key.usable(self._now()):
            return None
        return entry.principal

    def invalidate(self, message: str) -> None:
        """Drop what a `key:<sha256>` or `tenant:<id>` message names; anything else drops all.

        `browser-key:{...}` (a mint) adds that key's origins to the live set instead.
        """
        kind, _, value = message.partition(":")
        if kind == "browser-key":
            try:
                digest, entry = parse_browser_key(value)
            except (ValueError, KeyError, TypeError):
                log.warning("browser_key_message_unreadable")
                return
            self.origins.add(digest, entry)
            return
        self._generation += 1
        if kind == "key":
            self._cache.pop(value, None)
            self.origins.remove(value)
        elif kind == "tenant":
            for digest in [
                d for d, entry in self._cache.items() if entry.principal.tenant.id == value
            ]:
                del self._cache[digest]
        else:
            self._cache.clear()

    def _cached(self, digest: str) -> _Entry | None:
        """The cached entry, fresh or not: a stale one still serves through an outage."""
        if not self._caching:
            return None
        entry = self._cache.get(digest)
        if entry is None:
            return None
        if self._monotonic() - entry.fetched_at >= max(self._cache_seconds, self._outage_seconds):
            del self._cache[digest]
            return None
        self._cache.move_to_end(digest)
        return entry

    def _fresh(self, entry: _Entry) -> bool:
        ttl = self._cache_seconds if self.listening else _FALLBACK_TTL_SECONDS
        return not entry.stale and self._monotonic() - entry.fetched_at < ttl

    async def _verify(self, digest: str, stale: _Entry | None) -> _Entry | None:
        """Look the key up in Redis; during an outage fall back on what this process verified."""
        if self._caching and not self._outage.active:
            try:
                async with asyncio.timeout(REDIS_DEADLINE_S):
                    entry = await self._fetch(digest)
            except (*OUTAGE_ERRORS, RedisUnavailable) as exc:
                self._outage.failed(exc, by="key_lookup")
            else:
                self._outage.succeeded()
                if entry is None or not entry.key.usable(self._now()):
                    # Gone, revoked or expired in Redis: the stale entry must not outlive it
                    # (it would be served again during an outage).
                    self._cache.pop(digest, None)
                return entry
        elif not self._caching:
            return await self._fetch(digest)
        if stale is not None and self._monotonic() - stale.fetched_at < self._outage_seconds:
            return stale
        raise RedisUnavailable("checking this API key")

    async def _fetch(self, digest: str) -> _Entry | None:
        generation = self._generation
        fetched_at = self._monotonic()
        key = await self._store.key_by_hash(digest)
        if key is None:
            # Unknown keys are not cached: a key minted a moment ago must work at once, and
            # guessing is throttled by the auth-failure limiter, not by this cache.
            return None
        tenant = await self._store.get_tenant(key.tenant)
        if tenant is None:
            return None
        principal = Principal(
            tenant=tenant,
            key_id=key.id,
            key_prefix=key.prefix,
            scopes=frozenset(key.scopes),
            allowed_origins=(
                frozenset(key.allowed_origins) if key.allowed_origins is not None else None
            ),
            client_rate_limit=key.client_rate_limit,
        )
        entry = _Entry(key=key, principal=principal, fetched_at=fetched_at)
        if self._caching and generation == self._generation and key.usable(self._now()):
            self._cache[digest] = entry
            browser = browser_entry(key)
            if browser is not None:
                # Verified live just now: its answers carry CORS headers even if this request
                # beat the mint's message here (the generation check keeps a revoke's out).
                self.origins.add(digest, browser)
            if len(self._cache) > _CACHE_MAX_ENTRIES:
                self._cache.popitem(last=False)
        return entry

    async def _on_subscribed(self) -> None:
        # Messages published while we were not subscribed are lost: read every entry again
        # before its next use (an outage that follows still finds it).
        self._generation += 1
        for digest, entry in list(self._cache.items()):
            self._cache[digest] = replace(entry, stale=True)
        # Subscribed first, loaded second: a mint after this is heard, one before is read.
        self.origins.replace(await self._store.browser_keys())

    def _on_invalidation(self, channel: bytes | str, data: bytes | str) -> None:
        self.invalidate(data.decode() if isinstance(data, bytes) else str(data))
