"""The Authenticator: admin key, lookups, the in-process cache and its invalidation."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from redis.asyncio import Redis

from app import redis as redis_keys
from app.errors import ServiceUnavailable
from app.tenancy import authenticator as auth_module
from app.tenancy.authenticator import ADMIN_TENANT_ID, Authenticator
from app.tenancy.keys import hash_key
from app.tenancy.models import ApiKey, Principal, Tenant, TenantCreate, TenantUpdate
from app.tenancy.store import MemoryTenantStore, RedisTenantStore
from tests.support import MovableClock, RedisServer, free_port

ADMIN_KEY = "bootstrap-admin-secret"


class CountingStore(RedisTenantStore):
    """The Redis store, counting the lookups the authenticator makes."""

    def __init__(self, redis: Redis) -> None:
        super().__init__(redis)
        self.lookups = 0

    async def key_by_hash(self, digest: str) -> ApiKey | None:
        self.lookups += 1
        return await super().key_by_hash(digest)


@pytest.fixture
async def store(redis: Redis) -> CountingStore:
    store = CountingStore(redis)
    await store.create_tenant(TenantCreate(id="acme", rate_limit="5/second"))
    return store


async def _authenticator(
    store: RedisTenantStore | MemoryTenantStore, redis: Redis | None, **kwargs: Any
) -> Authenticator:
    authenticator = Authenticator(store, admin_key=ADMIN_KEY, redis=redis, **kwargs)
    await authenticator.start()
    if redis is not None:
        await _until_listening(authenticator, 3)
    return authenticator


async def _until_listening(authenticator: Authenticator, seconds: float) -> None:
    # Polled: `listening` is a function of time (pings answered lately), not an event to await.
    async with asyncio.timeout(seconds):
        while not authenticator.listening:  # noqa: ASYNC110
            await asyncio.sleep(0.02)


@pytest.fixture
async def authenticator(store: CountingStore, redis: Redis) -> AsyncIterator[Authenticator]:
    authenticator = await _authenticator(store, redis)
    yield authenticator
    await authenticator.close()


async def _until_resubscribed(redis: Redis, seconds: float) -> None:
    """Until the invalidation channel has a subscriber again (after its connection was killed)."""
    async with asyncio.timeout(seconds):
        while True:
            [(_, subscribers)] = await redis.pubsub_numsub(redis_keys.CHANNEL_INVALIDATE)
            if subscribers:
                return
            await asyncio.sleep(0.02)


async def _refused_within(authenticator: Authenticator, key: str, seconds: float) -> float:
    """Seconds until `key` is refused; fails the test past `seconds`."""
    started = time.monotonic()
    while await authenticator.principal_for(key) is not None:
        if time.monotonic() - started > seconds:
            pytest.fail(f"key still accepted after {seconds}s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


class TestLookup:
    async def test_minted_key(self, store: CountingStore, authenticator: Authenticator) -> None:
        key, secret = await store.create_key("acme", scopes=["execute"])
        principal = await authenticator.principal_for(secret)
        assert principal is not None
        assert principal.tenant.id == "acme"
        assert principal.tenant.rate_limit == "5/second"
        assert principal.key_id == key.id
        assert principal.key_prefix == secret[:12]
        assert principal.can("execute")
        assert not principal.can("admin")

    async def test_unknown_key(self, authenticator: Authenticator) -> None:
        assert await authenticator.principal_for("pgw_nope") is None
        assert await authenticator.principal_for("") is None

    async def test_admin_key(self, authenticator: Authenticator) -> None:
        principal = await authenticator.principal_for(ADMIN_KEY)
        assert principal is not None
        assert principal.can("admin")
        assert principal.tenant.id == ADMIN_TENANT_ID
        assert ADMIN_KEY not in principal.key_prefix
        assert await authenticator.principal_for(ADMIN_KEY + " ") is None
        assert await authenticator.principal_for(ADMIN_KEY[:-1]) is None

    async def test_admin_tenant_id_is_not_a_valid_tenant_id(self) -> None:
        with pytest.raises(ValueError, match="not a tenant id"):
            TenantCreate(id=ADMIN_TENANT_ID)

    async def test_no_admin_key_configured(self, store: CountingStore) -> None:
        authenticator = Authenticator(store, admin_key=None, redis=None)
        assert await authenticator.principal_for("") is None
        assert await authenticator.principal_for(ADMIN_KEY) is None

    async def test_expired_key(self, store: CountingStore, authenticator: Authenticator) -> None:
        past = datetime.now(UTC) - timedelta(seconds=1)
        _, secret = await store.create_key("acme", expires_at=past)
        assert await authenticator.principal_for(secret) is None

    async def test_expiry_checked_on_every_use(self, store: CountingStore, redis: Redis) -> None:
        clock = MovableClock()
        authenticator = await _authenticator(store, redis, clock=clock)
        try:
            soon = datetime.fromtimestamp(clock.wall(), UTC) + timedelta(milliseconds=600)
            _, secret = await store.create_key("acme", expires_at=soon)
            assert await authenticator.principal_for(secret) is not None
            clock.advance(0.5)
            assert await authenticator.principal_for(secret) is not None  # served from the cache
            assert store.lookups == 1
            clock.advance(0.2)  # past its expiry: refused, though the entry is still fresh
            assert await authenticator.principal_for(secret) is None
            assert store.lookups == 1
        finally:
            await authenticator.close()

    async def test_key_of_deleted_tenant(
        self, store: CountingStore, authenticator: Authenticator
    ) -> None:
        _, secret = await store.create_key("acme")
        assert await authenticator.principal_for(secret) is not None
        await store.delete_tenant("acme")
        await _refused_within(authenticator, secret, 2)


class TestCache:
    async def test_hot_path_does_not_hit_the_store(
        self, store: CountingStore, authenticator: Authenticator
    ) -> None:
        _, secret = await store.create_key("acme")
        for _ in range(50):
            assert await authenticator.principal_for(secret) is not None
        assert store.lookups == 1

    async def test_unknown_keys_are_not_cached(
        self, store: CountingStore, authenticator: Authenticator
    ) -> None:
        # A key looked up before it exists must work the moment it is minted.
        key, secret = await store.create_key("acme")
        digest = hash_key(secret)
        raw = await store._redis.get(f"pgw:key:{digest}")
        await store._redis.delete(f"pgw:key:{digest}")
        assert await authenticator.principal_for(secret) is None
        assert raw is not None
        await store._redis.set(f"pgw:key:{digest}", raw)
        principal = await authenticator.principal_for(secret)
        assert principal is not None
        assert principal.key_id == key.id

    async def test_revocation_through_pubsub(
        self, store: CountingStore, authenticator: Authenticator
    ) -> None:
        key, secret = await store.create_key("acme")
        assert await authenticator.principal_for(secret) is not None
        await store.revoke_key(key.id)
        assert await _refused_within(authenticator, secret, 2) < 0.5

    async def test_revocation_by_another_process(
        self, redis_server: RedisServer, store: CountingStore, authenticator: Authenticator
    ) -> None:
        """A second store on its own connection (as the CLI or another replica) revokes."""
        key, secret = await store.create_key("acme")
        assert await authenticator.principal_for(secret) is not None
        other = Redis.from_url(redis_server.url)
        try:
            await RedisTenantStore(other).revoke_key(key.id)
        finally:
            await other.aclose()
        await _refused_within(authenticator, secret, 2)

    async def test_tenant_change_reaches_cached_principal(
        self, store: CountingStore, authenticator: Authenticator
    ) -> None:
        _, secret = await store.create_key("acme")
        assert await authenticator.principal_for(secret) is not None
        await store.update_tenant("acme", TenantUpdate(rate_limit="1/second"))
        async with asyncio.timeout(2):
            while True:
                principal = await authenticator.principal_for(secret)
                assert principal is not None
                if principal.tenant.rate_limit == "1/second":
                    break
                await asyncio.sleep(0.02)

    async def test_short_ttl_while_channel_is_down(self, store: CountingStore) -> None:
        # The store works but the invalidation channel can't connect: entries live only 1 s.
        clock = MovableClock()
        dead = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.2)
        authenticator = Authenticator(
            store, admin_key=None, redis=dead, cache_seconds=30, clock=clock
        )
        await authenticator.start()
        try:
            key, secret = await store.create_key("acme")
            assert await authenticator.principal_for(secret) is not None
            assert not authenticator.listening
            await store.revoke_key(key.id)
            clock.advance(1.5)  # within the contract's 2 s, with no invalidation heard
            assert await authenticator.principal_for(secret) is None
        finally:
            await authenticator.close()
            await dead.aclose()

    async def test_channel_recovers_after_redis_connection_killed(
        self, redis: Redis, store: CountingStore, authenticator: Authenticator
    ) -> None:
        await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")  # type: ignore[no-untyped-call]
        await _until_resubscribed(redis, 5)
        await _until_listening(authenticator, 5)
        key, secret = await store.create_key("acme")
        assert await authenticator.principal_for(secret) is not None
        await store.revoke_key(key.id)
        await _refused_within(authenticator, secret, 2)

    async def test_lookup_racing_an_invalidation_is_not_cached(
        self, redis: Redis, store: CountingStore
    ) -> None:
        authenticator = Authenticator(store, admin_key=None, redis=redis)
        key, secret = await store.create_key("acme")
        stale = await store.key_by_hash(key.hash)

        class RacingStore(CountingStore):
            async def key_by_hash(self, digest: str) -> ApiKey | None:
                self.lookups += 1
                authenticator.invalidate(f"key:{digest}")  # the revocation lands mid-lookup
                return stale

        racing = RacingStore(redis)
        authenticator._store = racing
        assert authenticator._invalidations is not None
        authenticator._invalidations._last_heard = time.monotonic() + 60  # pretend: listening
        await authenticator.principal_for(secret)
        await authenticator.principal_for(secret)
        assert racing.lookups == 2

    async def test_cache_is_bounded(
        self, monkeypatch: pytest.MonkeyPatch, store: CountingStore, authenticator: Authenticator
    ) -> None:
        monkeypatch.setattr(auth_module, "_CACHE_MAX_ENTRIES", 3)
        secrets = [(await store.create_key("acme"))[1] for _ in range(6)]
        for secret in secrets:
            assert await authenticator.principal_for(secret) is not None
        assert len(authenticator._cache) == 3
        store.lookups = 0
        assert await authenticator.principal_for(secrets[-1]) is not None
        assert store.lookups == 0  # the most recent ones stay
        assert await authenticator.principal_for(secrets[0]) is not None
        assert store.lookups == 1


class TestLifecycle:
    async def test_close_right_after_start_is_prompt(
        self, store: CountingStore, redis: Redis
    ) -> None:
        # On Python 3.11 redis-py can lose a cancel that lands while the pubsub connects
        # (asyncio.wait_for's race): close must still return, never hang a shutdown.
        for delay in (0, 0.001, 0.003, 0.005, 0.01) * 6:
            authenticator = Authenticator(store, admin_key=None, redis=redis)
            await authenticator.start()
            await asyncio.sleep(delay)
            async with asyncio.timeout(3):
                await authenticator.close()


class TestMemoryStore:
    async def test_revocation_is_immediate(self) -> None:
        store = MemoryTenantStore()
        await store.create_tenant(TenantCreate(id="acme"))
        key, secret = await store.create_key("acme")
        authenticator = await _authenticator(store, None)
        principal = await authenticator.principal_for(secret)
        assert isinstance(principal, Principal)
        assert isinstance(principal.tenant, Tenant)
        await store.revoke_key(key.id)
        assert await authenticator.principal_for(secret) is None
        await authenticator.close()


class TestRedisOutage:
    """Redis unreachable: verified keys work on for `outage_seconds`, others are 503."""

    @pytest.fixture
    async def down(self) -> AsyncIterator[tuple[RedisServer, Redis, RedisTenantStore]]:
        own = RedisServer()
        own.start()
        client = Redis.from_url(own.url, socket_connect_timeout=0.5, socket_timeout=1.0)
        yield own, client, RedisTenantStore(client)
        await client.aclose()
        own.stop()

    async def test_verified_key_served_unseen_key_503(
        self, down: tuple[RedisServer, Redis, RedisTenantStore]
    ) -> None:
        server, client, store = down
        await store.create_tenant(TenantCreate(id="acme"))
        _, verified = await store.create_key("acme")
        _, unseen = await store.create_key("acme")
        # Past the key cache's 30 s, only the outage grace keeps the key working.
        clock = MovableClock()
        authenticator = await _authenticator(
            store, client, cache_seconds=30, outage_seconds=60, clock=clock
        )
        try:
            assert await authenticator.principal_for(verified) is not None
            server.stop()
            clock.advance(31)  # the cached entry is no longer fresh
            for _ in range(3):
                principal = await authenticator.principal_for(verified)
                assert principal is not None
                assert principal.tenant.id == "acme"
                with pytest.raises(ServiceUnavailable) as info:
                    await authenticator.principal_for(unseen)
                assert info.value.status_code == 503
                assert int(info.value.headers["Retry-After"]) >= 1
        finally:
            await authenticator.close()

    async def test_grace_ends(self, down: tuple[RedisServer, Redis, RedisTenantStore]) -> None:
        server, client, store = down
        await store.create_tenant(TenantCreate(id="acme"))
        _, verified = await store.create_key("acme")
        clock = MovableClock()
        authenticator = await _authenticator(
            store, client, cache_seconds=30, outage_seconds=60, clock=clock
        )
        try:
            assert await authenticator.principal_for(verified) is not None
            server.stop()
            clock.advance(59)  # within the grace: served
            assert await authenticator.principal_for(verified) is not None
            clock.advance(1)  # past the grace: it cannot be checked any more
            with pytest.raises(ServiceUnavailable):
                await authenticator.principal_for(verified)
        finally:
            await authenticator.close()

    async def test_revoked_while_deaf_is_not_served_in_a_later_outage(
        self, down: tuple[RedisServer, Redis, RedisTenantStore]
    ) -> None:
        server, client, store = down
        await store.create_tenant(TenantCreate(id="acme"))
        key, secret = await store.create_key("acme")
        clock = MovableClock()
        authenticator = await _authenticator(
            store, client, cache_seconds=30, outage_seconds=60, clock=clock
        )
        try:
            assert await authenticator.principal_for(secret) is not None
            # Revoked behind the authenticator's back (no invalidation reaches it).
            raw = await client.get(redis_keys.KEY + key.hash)
            assert raw is not None
            revoked = {**key.model_dump(mode="json"), "hash": key.hash, "revoked": True}
            await client.set(redis_keys.KEY + key.hash, json.dumps(revoked))
            clock.advance(31)  # the cached entry is no longer fresh
            assert await authenticator.principal_for(secret) is None  # re-read: revoked
            server.stop()
            with pytest.raises(ServiceUnavailable):
                await authenticator.principal_for(secret)
        finally:
            await authenticator.close()
