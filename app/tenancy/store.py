"""Where tenants and keys live: one Protocol, a Redis store (shared by every replica) and an
in-process one (one process only, for `GATEWAY_REDIS_URL` unset).

Redis layout (prefixes from `app.redis`):

- `pgw:tenant:<id>` tenant JSON; `pgw:tenants` the set of tenant ids
- `pgw:key:<sha256>` key JSON (hash, prefix, scopes, never the key itself)
- `pgw:keyid:<key id>` the sha256 of that key; `pgw:tenant-keys:<tenant>` the tenant's key ids
- `pgw:browser-keys` hash: sha256 -> `{"origins", "expires_at"}` of every unrevoked browser key,
  what a gateway process loads when it (re)subscribes, so CORS never scans Redis

Every write runs in MULTI/EXEC (with WATCH where it reads first) and publishes `key:<sha256>` or
`tenant:<id>` on `pgw:invalidate` inside the same transaction, so a process caching lookups hears
of a change exactly when it becomes visible. Minting a browser key also publishes
`browser-key:{"digest", "origins", "expires_at"}`, so every process answers CORS for its origins;
`key:<sha256>` (revoke, tenant delete) takes them away again.

Given the process's `RedisOutage` (the gateway does; the CLI reports Redis errors itself), every
call is answered 503 while Redis is unreachable, at once once the outage is known, never 500.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, Concatenate, Final, ParamSpec, Protocol, TypeVar

import orjson
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import WatchError

from app import redis as redis_keys
from app.errors import Conflict, NotFound
from app.redis_outage import OUTAGE_ERRORS, RedisOutage, RedisUnavailable
from app.tenancy.keys import generate_key, generate_key_id, hash_key, key_prefix
from app.tenancy.models import ApiKey, Scope, Tenant, TenantCreate, TenantUpdate
from app.tenancy.origins import BrowserKey, OriginIndex

__all__ = [
    "MemoryTenantStore",
    "RedisTenantStore",
    "TenantStore",
    "browser_entry",
    "browser_key_message",
    "create_store",
    "invalidation_for_key",
    "invalidation_for_tenant",
    "parse_browser_key",
]

_T = TypeVar("_T")
_P = ParamSpec("_P")
# Fields whose None means "the default" in a PATCH, because the stored tenant can't hold None.
_NOT_NULLABLE: Final = ("allowed_languages", "cache")
_WATCH_RETRIES: Final = 20


class TenantStore(Protocol):
    async def create_tenant(self, data: TenantCreate) -> Tenant: ...
    async def get_tenant(self, tenant_id: str) -> Tenant | None: ...
    async def list_tenants(self) -> list[Tenant]: ...
    async def update_tenant(self, tenant_id: str, patch: TenantUpdate) -> Tenant: ...
    async def delete_tenant(self, tenant_id: str) -> None: ...
    async def create_key(
        self,
        tenant_id: str,
        *,
        name: str | None = None,
        scopes: list[Scope] | None = None,
        expires_at: datetime | None = None,
        allowed_origins: list[str] | None = None,
        client_rate_limit: str | None = None,
    ) -> tuple[ApiKey, str]: ...
    async def list_keys(self, tenant_id: str) -> list[ApiKey]: ...
    async def revoke_key(self, key_id: str) -> ApiKey: ...
    async def key_by_hash(self, digest: str) -> ApiKey | None: ...
    async def browser_keys(self) -> dict[str, BrowserKey]: ...


def invalidation_for_key(digest: str) -> str:
    return f"key:{digest}"


def invalidation_for_tenant(tenant_id: str) -> str:
    return f"tenant:{tenant_id}"


def browser_entry(key: ApiKey) -> BrowserKey | None:
    """What CORS needs of a browser key (None for an ordinary key)."""
    if key.allowed_origins is None:
        return None
    expires = key.expires_at.timestamp() if key.expires_at is not None else None
    return BrowserKey(frozenset(key.allowed_origins), expires)


def _dumpbrowser_entry(entry: BrowserKey) -> bytes:
    return orjson.dumps({"origins": sorted(entry.origins), "expires_at": entry.expires_at})


def _loadbrowser_entry(raw: bytes | str) -> BrowserKey:
    data = orjson.loads(raw)
    expires = data.get("expires_at")
    return BrowserKey(frozenset(data["origins"]), None if expires is None else float(expires))


def browser_key_message(digest: str, entry: BrowserKey) -> str:
    """The `browser-key:` message a mint publishes: the key's digest, origins and expiry."""
    body = {"digest": digest, "origins": sorted(entry.origins), "expires_at": entry.expires_at}
    return "browser-key:" + orjson.dumps(body).decode()


def parse_browser_key(payload: str) -> tuple[str, BrowserKey]:
    """What follows `browser-key:`; ValueError (or KeyError, TypeError) if malformed."""
    data = orjson.loads(payload)
    return str(data["digest"]), _loadbrowser_entry(payload)


def _tenant_exists(tenant_id: str) -> NotFound:
    return NotFound(f"tenant '{tenant_id}' does not exist")


def _new_tenant(data: TenantCreate) -> Tenant:
    # None in the body means "not given": the stored tenant's own defaults apply.
    return Tenant.model_validate(data.model_dump(exclude_none=True))


def _patched(tenant: Tenant, patch: TenantUpdate) -> Tenant:
    merged: dict[str, Any] = tenant.model_dump()
    merged["created_at"] = tenant.created_at
    for name in patch.model_fields_set:
        merged[name] = getattr(patch, name)
    for name in _NOT_NULLABLE:
        if merged.get(name) is None:
            merged.pop(name, None)
    return Tenant.model_validate(merged)


def _new_key(
    tenant_id: str,
    *,
    name: str | None,
    scopes: list[Scope] | None,
    expires_at: datetime | None,
    allowed_origins: list[str] | None,
    client_rate_limit: str | None,
) -> tuple[ApiKey, str]:
    secret = generate_key()
    key = ApiKey(
        id=generate_key_id(),
        tenant=tenant_id,
        name=name,
        prefix=key_prefix(secret),
        scopes=list(dict.fromkeys(scopes)) if scopes else ["execute"],
        created_at=datetime.now(UTC),
        expires_at=expires_at.astimezone(UTC) if expires_at is not None else None,
        allowed_origins=allowed_origins,
        client_rate_limit=client_rate_limit,
        hash=hash_key(secret),
    )
    return key, secret


def _sorted_keys(keys: list[ApiKey]) -> list[ApiKey]:
    return sorted(keys, key=lambda key: (key.created_at, key.id))


def _begin(pipe: Pipeline) -> None:
    """End the WATCHed reads and start queueing the MULTI block."""
    pipe.multi()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# Stored times keep their microseconds (answers show whole seconds): an expiry must not move.
def _dump_tenant(tenant: Tenant) -> bytes:
    return orjson.dumps({**tenant.model_dump(mode="json"), "created_at": tenant.created_at})


def _dump_key(key: ApiKey) -> bytes:
    # `hash` is excluded from every answer, but the store must keep it (lookup by id needs it).
    return orjson.dumps(
        {
            **key.model_dump(mode="json"),
            "created_at": key.created_at,
            "expires_at": key.expires_at,
            "hash": key.hash,
        }
    )


def _load_tenant(raw: bytes | str) -> Tenant:
    return Tenant.model_validate_json(raw)


def _load_key(raw: bytes | str) -> ApiKey:
    return ApiKey.model_validate_json(raw)


def _guarded(
    method: Callable[Concatenate[RedisTenantStore, _P], Coroutine[Any, Any, _T]],
) -> Callable[Concatenate[RedisTenantStore, _P], Coroutine[Any, Any, _T]]:
    """Redis unreachable: 503 (and the outage reported once), not the client's exception."""

    @functools.wraps(method)
    async def call(store: RedisTenantStore, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        outage = store._outage
        if outage is None:
            return await method(store, *args, **kwargs)
        if outage.active:
            raise RedisUnavailable("the tenant store")
        try:
            result = await method(store, *args, **kwargs)
        except OUTAGE_ERRORS as exc:
            outage.failed(exc, by="tenant_store")
            raise RedisUnavailable("the tenant store") from None
        outage.succeeded()
        return result

    return call


class RedisTenantStore:
    """Tenants and keys in Redis, shared by every gateway process and the CLI."""

    def __init__(self, redis: Redis, *, outage: RedisOutage | None = None) -> None:
        self._redis = redis
        self._outage = outage

    async def _transaction(self, body: Callable[[Pipeline], Awaitable[_T]], *watch: str) -> _T:
        """Run `body` under WATCH (it reads, calls `_begin`, queues writes); retried on a race."""
        for _ in range(_WATCH_RETRIES):
            async with self._redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(*watch)
                    result = await body(pipe)
                    await pipe.execute()
                    return result
                except WatchError:
                    continue
        raise Conflict("the store is busy with concurrent changes to this item; try again")

    @_guarded
    async def create_tenant(self, data: TenantCreate) -> Tenant:
        tenant = _new_tenant(data)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(redis_keys.tenant_record(tenant.id), _dump_tenant(tenant), nx=True)
            pipe.sadd(redis_keys.tenant_index(), tenant.id)
            pipe.publish(redis_keys.CHANNEL_INVALIDATE, invalidation_for_tenant(tenant.id))
            created, *_ = await pipe.execute()
        if not created:
            raise Conflict(f"tenant '{tenant.id}' already exists")
        return tenant

    @_guarded
    async def get_tenant(self, tenant_id: str) -> Tenant | None:
        raw = await self._redis.get(redis_keys.tenant_record(tenant_id))
        return None if raw is None else _load_tenant(raw)

    @_guarded
    async def list_tenants(self) -> list[Tenant]:
        ids = sorted(_text(item) for item in await self._redis.smembers(redis_keys.tenant_index()))
        if not ids:
            return []
        raws = await self._redis.mget([redis_keys.tenant_record(tenant_id) for tenant_id in ids])
        return [_load_tenant(raw) for raw in raws if raw is not None]

    @_guarded
    async def update_tenant(self, tenant_id: str, patch: TenantUpdate) -> Tenant:
        key = redis_keys.tenant_record(tenant_id)

        async def body(pipe: Pipeline) -> Tenant:
            raw = await pipe.get(key)
            if raw is None:
                raise _tenant_exists(tenant_id)
            tenant = _patched(_load_tenant(raw), patch)
            _begin(pipe)
            pipe.set(key, _dump_tenant(tenant))
            pipe.publish(redis_keys.CHANNEL_INVALIDATE, invalidation_for_tenant(tenant_id))
            return tenant

        return await self._transaction(body, key)

    @_guarded
    async def delete_tenant(self, tenant_id: str) -> None:
        tenant_key = redis_keys.tenant_record(tenant_id)
        keys_set = redis_keys.tenant_keys(tenant_id)

        async def body(pipe: Pipeline) -> None:
            if not await pipe.exists(tenant_key):
                raise _tenant_exists(tenant_id)
            key_ids = [_text(item) for item in await pipe.smembers(keys_set)]
            digests = (
                await pipe.mget([redis_keys.key_by_id(key_id) for key_id in key_ids])
                if key_ids
                else []
            )
            _begin(pipe)
            pipe.delete(tenant_key, keys_set)
            pipe.srem(redis_keys.tenant_index(), tenant_id)
            # The keys go with the tenant: a lookup then finds nothing, the strongest revocation,
            # and a tenant created later under the same id does not inherit them.
            for key_id, digest in zip(key_ids, digests, strict=True):
                pipe.delete(redis_keys.key_by_id(key_id))
                if digest is not None:
                    pipe.delete(redis_keys.key_record(_text(digest)))
                    pipe.hdel(redis_keys.BROWSER_KEYS, _text(digest))
                    pipe.publish(redis_keys.CHANNEL_INVALIDATE, invalidation_for_key(_text(digest)))
            pipe.publish(redis_keys.CHANNEL_INVALIDATE, invalidation_for_tenant(tenant_id))

        # Watching the key set too: a key minted mid-delete retries the delete rather than survive.
        await self._transaction(body, tenant_key, keys_set)

    @_guarded
    async def create_key(
        self,
        tenant_id: str,
        *,
        name: str | None = None,
        scopes: list[Scope] | None = None,
        expires_at: datetime | None = None,
        allowed_origins: list[str] | None = None,
        client_rate_limit: str | None = None,
    ) -> tuple[ApiKey, str]:
        key, secret = _new_key(
            tenant_id,
            name=name,
            scopes=scopes,
            expires_at=expires_at,
            allowed_origins=allowed_origins,
            client_rate_limit=client_rate_limit,
        )
        tenant_key = redis_keys.tenant_record(tenant_id)
        browser = browser_entry(key)

        async def body(pipe: Pipeline) -> None:
            # Watching the tenant makes "it exists" and "the key is written" one atomic fact.
            if not await pipe.exists(tenant_key):
                raise _tenant_exists(tenant_id)
            _begin(pipe)
            pipe.set(redis_keys.key_record(key.hash), _dump_key(key))
            pipe.set(redis_keys.key_by_id(key.id), key.hash)
            pipe.sadd(redis_keys.tenant_keys(tenant_id), key.id)
            # Published although nothing cached it yet, so no process keeps a stale negative.
            pipe.publish(redis_keys.CHANNEL_INVALIDATE, invalidation_for_key(key.hash))
            if browser is not None:
                pipe.hset(redis_keys.BROWSER_KEYS, key.hash, _dumpbrowser_entry(browser))
                pipe.publish(redis_keys.CHANNEL_INVALIDATE, browser_key_message(key.hash, browser))

        await self._transaction(body, tenant_key)
        return key, secret

    @_guarded
    async def list_keys(self, tenant_id: str) -> list[ApiKey]:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.exists(redis_keys.tenant_record(tenant_id))
            pipe.smembers(redis_keys.tenant_keys(tenant_id))
            exists, members = await pipe.execute()
        if not exists:
            raise _tenant_exists(tenant_id)
        key_ids = [_text(item) for item in members]
        if not key_ids:
            return []
        digests = await self._redis.mget([redis_keys.key_by_id(key_id) for key_id in key_ids])
        present = [_text(digest) for digest in digests if digest is not None]
        if not present:
            return []
        raws = await self._redis.mget([redis_keys.key_record(digest) for digest in present])
        return _sorted_keys([_load_key(raw) for raw in raws if raw is not None])

    @_guarded
    async def revoke_key(self, key_id: str) -> ApiKey:
        raw_digest = await self._redis.get(redis_keys.key_by_id(key_id))
        if raw_digest is None:
            raise NotFound(f"key '{key_id}' does not exist")
        record = redis_keys.key_record(_text(raw_digest))

        async def body(pipe: Pipeline) -> ApiKey:
            raw = await pipe.get(record)
            if raw is None:
                raise NotFound(f"key '{key_id}' does not exist")
            key = _load_key(raw).model_copy(update={"revoked": True})
            _begin(pipe)
            pipe.set(record, _dump_key(key))
            pipe.hdel(redis_keys.BROWSER_KEYS, key.hash)
            pipe.publish(redis_keys.CHANNEL_INVALIDATE, invalidation_for_key(key.hash))
            return key

        return await self._transaction(body, record)

    @_guarded
    async def key_by_hash(self, digest: str) -> ApiKey | None:
        raw = await self._redis.get(redis_keys.key_record(digest))
        return None if raw is None else _load_key(raw)

    @_guarded
    async def browser_keys(self) -> dict[str, BrowserKey]:
        """Every unexpired, unrevoked browser key's origins (read once per (re)subscribe).

        Expired entries found on the way are deleted: their keys can never be live again.
        """
        raw = await self._redis.hgetall(redis_keys.BROWSER_KEYS)
        now = datetime.now(UTC).timestamp()
        entries = {_text(digest): _loadbrowser_entry(value) for digest, value in raw.items()}
        expired = [digest for digest, entry in entries.items() if not entry.live(now)]
        if expired:
            await self._redis.hdel(redis_keys.BROWSER_KEYS, *expired)
        return {digest: entry for digest, entry in entries.items() if entry.live(now)}


class MemoryTenantStore:
    """Tenants and keys in this process only: nothing is shared, nothing survives a restart.

    The gateway's authenticator does not cache over this store (a dict lookup is the cache), so
    no invalidation messages are needed.
    """

    def __init__(self) -> None:
        self._tenants: dict[str, Tenant] = {}
        self._keys: dict[str, ApiKey] = {}  # by sha256
        self._key_ids: dict[str, str] = {}  # key id -> sha256
        # The live browser keys' origins, kept as keys change (the authenticator reads this one).
        self.origins = OriginIndex()

    async def create_tenant(self, data: TenantCreate) -> Tenant:
        if data.id in self._tenants:
            raise Conflict(f"tenant '{data.id}' already exists")
        tenant = _new_tenant(data)
        self._tenants[tenant.id] = tenant
        return tenant

    async def get_tenant(self, tenant_id: str) -> Tenant | None:
        return self._tenants.get(tenant_id)

    async def list_tenants(self) -> list[Tenant]:
        return [self._tenants[tenant_id] for tenant_id in sorted(self._tenants)]

    async def update_tenant(self, tenant_id: str, patch: TenantUpdate) -> Tenant:
        tenant = self._tenants.get(tenant_id)
        if tenant is None:
            raise _tenant_exists(tenant_id)
        updated = _patched(tenant, patch)
        self._tenants[tenant_id] = updated
        return updated

    async def delete_tenant(self, tenant_id: str) -> None:
        if self._tenants.pop(tenant_id, None) is None:
            raise _tenant_exists(tenant_id)
        for digest, key in list(self._keys.items()):
            if key.tenant == tenant_id:
                del self._keys[digest]
                del self._key_ids[key.id]
                self.origins.remove(digest)

    async def create_key(
        self,
        tenant_id: str,
        *,
        name: str | None = None,
        scopes: list[Scope] | None = None,
        expires_at: datetime | None = None,
        allowed_origins: list[str] | None = None,
        client_rate_limit: str | None = None,
    ) -> tuple[ApiKey, str]:
        if tenant_id not in self._tenants:
            raise _tenant_exists(tenant_id)
        key, secret = _new_key(
            tenant_id,
            name=name,
            scopes=scopes,
            expires_at=expires_at,
            allowed_origins=allowed_origins,
            client_rate_limit=client_rate_limit,
        )
        self._keys[key.hash] = key
        self._key_ids[key.id] = key.hash
        browser = browser_entry(key)
        if browser is not None:
            self.origins.add(key.hash, browser)
        return key, secret

    async def list_keys(self, tenant_id: str) -> list[ApiKey]:
        if tenant_id not in self._tenants:
            raise _tenant_exists(tenant_id)
        return _sorted_keys([key for key in self._keys.values() if key.tenant == tenant_id])

    async def revoke_key(self, key_id: str) -> ApiKey:
        digest = self._key_ids.get(key_id)
        if digest is None:
            raise NotFound(f"key '{key_id}' does not exist")
        key = self._keys[digest].model_copy(update={"revoked": True})
        self._keys[digest] = key
        self.origins.remove(digest)
        return key

    async def key_by_hash(self, digest: str) -> ApiKey | None:
        return self._keys.get(digest)

    async def browser_keys(self) -> dict[str, BrowserKey]:
        now = datetime.now(UTC).timestamp()
        return {
            digest: entry
            for digest, key in self._keys.items()
            if not key.revoked and (entry := browser_entry(key)) is not None and entry.live(now)
        }


def create_store(redis: Redis | None, *, outage: RedisOutage | None = None) -> TenantStore:
    """The Redis store when Redis is configured, else the in-process one."""
    return MemoryTenantStore() if redis is None else RedisTenantStore(redis, outage=outage)
