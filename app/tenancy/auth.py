"""Who is calling: the key lookup (with its in-process cache) and the FastAPI dependencies.

The hot path is one SHA-256 and one dict lookup: keys found in Redis are cached in this process,
and every change to a key or tenant is announced on `pgw:invalidate`, which drops the cached
entry here within milliseconds. While that subscription is down, cached entries are trusted for
only `_FALLBACK_TTL_SECONDS`, so a revocation still reaches this process within the contract's
2 seconds.

While Redis itself is unreachable (the process's `RedisOutage`), nothing can be checked: a key
this process verified within `outage_seconds` keeps working from the cache, and any other key
is answered 503 (it cannot be checked), never 401 and never 500.

Browser keys: the same channel carries the origins CORS answers for. A mint publishes
`browser-key:{...}` (added to `origins`), a revoke or tenant delete `key:<sha256>` (removed);
every (re)subscribe loads the live browser keys once from `pgw:browser-keys`, so no message lost
while unsubscribed is missed, and no preflight ever reads Redis. A browser key's requests must
carry one of its origins (`check_origin`), on HTTP and on the WebSocket alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Final

import structlog
from fastapi import Depends, Request
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from starlette.requests import HTTPConnection

from app import redis_keys
from app.errors import Forbidden, Unauthorized
from app.redis_outage import OUTAGE_ERRORS, REDIS_DEADLINE_S, RedisOutage, RedisUnavailable
from app.state import get_state
from app.tenancy.keys import hash_key, key_from_headers
from app.tenancy.models import ApiKey, Principal, Tenant
from app.tenancy.origins import OriginIndex, request_origin
from app.tenancy.store import MemoryTenantStore, TenantStore, browser_entry, parse_browser_key

if TYPE_CHECKING:
    from app.limits import ClientLimit

__all__ = [
    "ADMIN_TENANT_ID",
    "Authenticator",
    "PrincipalDep",
    "authenticate",
    "check_origin",
    "client_limit",
    "require_scope",
]

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
    fetched_at: float
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
    ) -> None:
        self._store = store
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
        self._last_heard = float("-inf")
        self._listener: asyncio.Task[None] | None = None
        self._stopping = False
        self._channel_lost_logged = False  # one line per loss, not one per reconnect attempt
        # The live browser keys' origins: the in-process store keeps its own up to date.
        self.origins = store.origins if isinstance(store, MemoryTenantStore) else OriginIndex()

    @property
    def listening(self) -> bool:
        """True while the invalidation channel is subscribed and answering pings."""
        return time.monotonic() - self._last_heard < _DEAF_AFTER_SECONDS

    async def start(self) -> None:
        if self._caching and self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name="key-cache-invalidation")
            # Return once subscribed (or after a bound, if Redis is down): a cancel that lands
            # while redis-py is still connecting can be lost on Python 3.11, hanging shutdown.
            deadline = time.monotonic() + _START_WAIT_SECONDS
            while not self.listening and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.005)

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            # The flag, not only the cancel: on Python 3.11 a cancel that lands as redis-py's
            # read timeout fires is turned into that timeout and lost, and the loop would run on.
            self._stopping = True
            listener.cancel()
            done, _ = await asyncio.wait({listener}, timeout=_CLOSE_TIMEOUT_SECONDS)
            if not done:
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
        if entry is None or not entry.key.usable(datetime.now(UTC)):
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
        if time.monotonic() - entry.fetched_at >= max(self._cache_seconds, self._outage_seconds):
            del self._cache[digest]
            return None
        self._cache.move_to_end(digest)
        return entry

    def _fresh(self, entry: _Entry) -> bool:
        ttl = self._cache_seconds if self.listening else _FALLBACK_TTL_SECONDS
        return not entry.stale and time.monotonic() - entry.fetched_at < ttl

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
                if entry is None or not entry.key.usable():
                    # Gone, revoked or expired in Redis: the stale entry must not outlive it
                    # (it would be served again during an outage).
                    self._cache.pop(digest, None)
                return entry
        elif not self._caching:
            return await self._fetch(digest)
        if stale is not None and time.monotonic() - stale.fetched_at < self._outage_seconds:
            return stale
        raise RedisUnavailable("checking this API key")

    async def _fetch(self, digest: str) -> _Entry | None:
        generation = self._generation
        fetched_at = time.monotonic()
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
        if self._caching and generation == self._generation and key.usable():
            self._cache[digest] = entry
            browser = browser_entry(key)
            if browser is not None:
                # Verified live just now: its answers carry CORS headers even if this request
                # beat the mint's message here (the generation check keeps a revoke's out).
                self.origins.add(digest, browser)
            if len(self._cache) > _CACHE_MAX_ENTRIES:
                self._cache.popitem(last=False)
        return entry

    async def _listen(self) -> None:
        assert self._redis is not None
        while not self._stopping:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(redis_keys.CHANNEL_INVALIDATE)
                await self._pump(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any Redis or socket failure: reconnect, never die
                if not self._channel_lost_logged:
                    self._channel_lost_logged = True
                    log.warning("key_cache_channel_lost", error=type(exc).__name__)
            finally:
                self._last_heard = float("-inf")
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            if not self._stopping:
                await asyncio.sleep(_RECONNECT_DELAY_SECONDS)

    async def _pump(self, pubsub: PubSub) -> None:
        last_ping = 0.0
        while not self._stopping:
            now = time.monotonic()
            if now - last_ping >= _PING_INTERVAL_SECONDS:
                await pubsub.ping()
                last_ping = now
            message = await pubsub.get_message(timeout=_PING_INTERVAL_SECONDS)
            if message is None:
                continue
            kind = message.get("type")
            if kind in (b"subscribe", "subscribe"):
                # Messages published while we were not subscribed are lost: read every entry
                # again before its next use (an outage that follows still finds it).
                self._generation += 1
                for digest, entry in list(self._cache.items()):
                    self._cache[digest] = replace(entry, stale=True)
                # Subscribed first, loaded second: a mint after this is heard, one before is read.
                self.origins.replace(await self._store.browser_keys())
            elif kind in (b"message", "message"):
                data = message["data"]
                self.invalidate(data.decode() if isinstance(data, bytes) else str(data))
            self._last_heard = time.monotonic()
            if self._channel_lost_logged:
                self._channel_lost_logged = False
                log.info("key_cache_channel_restored")


def _client_address(connection: HTTPConnection) -> str:
    from app.limits import client_address

    state = get_state(connection)
    host = connection.client.host if connection.client is not None else "unknown"
    # Several header lines are one list (RFC 9110 5.3); the proxy's own line comes last, so
    # reading only the first would trust what the client wrote.
    forwarded = ", ".join(connection.headers.getlist("x-forwarded-for")) or None
    return str(client_address(host, forwarded, state.settings.trusted_proxies))


async def identify(connection: HTTPConnection, key: str | None) -> Principal | None:
    """The Principal for `key` as presented on this connection (HTTP or WebSocket), or None.

    A valid key is served whatever else came from its address, and no key at all is not an
    attempt; only a key that fails is checked against its address's failures (429 past the
    limit) and counted as one more.
    """
    if key is None:
        return None
    state = get_state(connection)
    principal = await state.authenticator.principal_for(key)
    if principal is None:
        address = _client_address(connection)
        state.auth_failures.check(address)
        await state.auth_failures.failed(address)
    return principal


def check_origin(principal: Principal, origin: str | None) -> None:
    """403 unless a browser key comes from one of its origins (`origin`: the Origin header)."""
    allowed = principal.allowed_origins
    if allowed is None:
        return
    if origin is None:
        raise Forbidden(
            "this key is a browser key: it only works from its allowed origins, and the "
            "request has no Origin header"
        )
    if request_origin(origin) not in allowed:
        raise Forbidden(f"origin '{origin}' is not allowed for this key")


def client_limit(connection: HTTPConnection, principal: Principal) -> ClientLimit | None:
    """The key's `client_rate_limit` for this client's address (X-Forwarded-For only from a
    trusted proxy), counted per key and address; None for a key without one."""
    from app.limits import ClientLimit

    if principal.client_rate_limit is None:
        return None
    return ClientLimit(
        principal.client_rate_limit, f"{principal.key_id}/{_client_address(connection)}"
    )


async def authenticate(request: Request) -> Principal:
    """The caller's Principal, or 401 (one answer for missing, unknown, revoked and expired);
    403 for a browser key from an origin it does not allow."""
    key = key_from_headers(request.headers.get("authorization"), request.headers.get("x-api-key"))
    principal = await identify(request, key)
    if principal is None:
        raise Unauthorized()
    request.state.principal = principal
    check_origin(principal, request.headers.get("origin"))
    return principal


PrincipalDep = Annotated[Principal, Depends(authenticate)]


def _check_scope(principal: Principal, scope: str) -> Principal:
    if not principal.can(scope):
        raise Forbidden(f"this key lacks the '{scope}' scope")
    return principal


async def authorize(request: Request, scope: str) -> Principal:
    """authenticate + the scope check as one plain call, for the execute hot path (FastAPI's
    dependency resolution costs a measurable share of a cache hit; see bench/)."""
    return _check_scope(await authenticate(request), scope)


def require_scope(scope: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency: the caller's Principal if its key has `scope`, else 403."""

    async def dependency(principal: PrincipalDep) -> Principal:
        return _check_scope(principal, scope)

    dependency.__name__ = f"require_{scope}_scope"
    return dependency
