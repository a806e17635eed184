"""Both tenant stores behave the same; the Redis one also publishes every change."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from redis.asyncio import Redis

from app import redis as redis_keys
from app.errors import Conflict, NotFound
from app.tenancy.keys import hash_key
from app.tenancy.models import TenantCreate, TenantUpdate
from app.tenancy.store import MemoryTenantStore, RedisTenantStore, TenantStore, create_store


@pytest.fixture(params=["redis", "memory"])
def store(request: pytest.FixtureRequest, redis: Redis) -> TenantStore:
    return RedisTenantStore(redis) if request.param == "redis" else MemoryTenantStore()


def test_create_store_picks_by_redis(redis: Redis) -> None:
    assert isinstance(create_store(redis), RedisTenantStore)
    assert isinstance(create_store(None), MemoryTenantStore)


class TestTenants:
    async def test_create_and_get(self, store: TenantStore) -> None:
        created = await store.create_tenant(
            TenantCreate(
                id="acme", name="Acme", allowed_languages=["Python"], rate_limit="5/second"
            )
        )
        assert created.allowed_languages == ["python"]
        assert created.cache is True
        fetched = await store.get_tenant("acme")
        assert fetched is not None
        assert fetched.model_dump(mode="json") == created.model_dump(mode="json")

    async def test_defaults(self, store: TenantStore) -> None:
        tenant = await store.create_tenant(TenantCreate(id="plain"))
        assert tenant.allowed_languages == ["*"]
        assert tenant.rate_limit is None
        assert tenant.daily_quota is None

    async def test_duplicate_is_conflict(self, store: TenantStore) -> None:
        await store.create_tenant(TenantCreate(id="acme"))
        with pytest.raises(Conflict, match="tenant 'acme' already exists"):
            await store.create_tenant(TenantCreate(id="acme", name="again"))
        tenant = await store.get_tenant("acme")
        assert tenant is not None
        assert tenant.name is None  # the first one is untouched

    async def test_get_unknown(self, store: TenantStore) -> None:
        assert await store.get_tenant("nobody") is None

    async def test_list_sorted(self, store: TenantStore) -> None:
        for tenant_id in ("zeta", "alpha", "mid"):
            await store.create_tenant(TenantCreate(id=tenant_id))
        assert [t.id for t in await store.list_tenants()] == ["alpha", "mid", "zeta"]

    async def test_update_changes_only_sent_fields(self, store: TenantStore) -> None:
        await store.create_tenant(
            TenantCreate(id="acme", name="Acme", rate_limit="5/second", cache=False)
        )
        patch = TenantUpdate.model_validate({"daily_quota": 100, "rate_limit": None})
        updated = await store.update_tenant("acme", patch)
        assert updated.daily_quota == 100
        assert updated.rate_limit is None  # sent as null: back to the global default
        assert updated.name == "Acme"
        assert updated.cache is False
        assert await store.get_tenant("acme") == updated

    async def test_update_null_resets_non_nullable_fields(self, store: TenantStore) -> None:
        await store.create_tenant(
            TenantCreate(id="acme", allowed_languages=["python"], cache=False)
        )
        patch = TenantUpdate.model_validate({"allowed_languages": None, "cache": None})
        updated = await store.update_tenant("acme", patch)
        assert updated.allowed_languages == ["*"]
        assert updated.cache is True

    async def test_update_unknown(self, store: TenantStore) -> None:
        with pytest.raises(NotFound, match="tenant 'nobody' does not exist"):
            await store.update_tenant("nobody", TenantUpdate(name="x"))

    async def test_delete_removes_tenant_and_keys(self, store: TenantStore) -> None:
        await store.create_tenant(TenantCreate(id="acme"))
        await store.create_tenant(TenantCreate(id="other"))
        key, secret = await store.create_key("acme")
        other_key, _ = await store.create_key("other")
        await store.delete_tenant("acme")
        assert await store.get_tenant("acme") is None
        assert [t.id for t in await store.list_tenants()] == ["other"]
        assert await store.key_by_hash(hash_key(secret)) is None
        with pytest.raises(NotFound):
            await store.revoke_key(key.id)
        assert await store.key_by_hash(other_key.hash) is not None

    async def test_recreated_tenant_does_not_inherit_keys(self, store: TenantStore) -> None:
        await store.create_tenant(TenantCreate(id="acme"))
        await store.create_key("acme")
        await store.delete_tenant("acme")
        await store.create_tenant(TenantCreate(id="acme"))
        assert await store.list_keys("acme") == []

    async def test_delete_unknown(self, store: TenantStore) -> None:
        with pytest.raises(NotFound):
            await store.delete_tenant("nobody")


class TestKeys:
    async def test_create_key(self, store: TenantStore) -> None:
        await store.create_tenant(TenantCreate(id="acme"))
        expires = datetime.now(UTC) + timedelta(days=1)
        key, secret = await store.create_key("acme", name="ci", expires_at=expires)
        assert secret.startswith("pgw_")
        assert key.prefix == secret[:12]
        assert key.hash == hash_key(secret)
        assert key.scopes == ["execute"]
        assert key.tenant == "acme"
        assert key.name == "ci"
        assert key.expires_at == expires
        assert key.usable()
        dumped = key.model_dump(mode="json")
        assert "hash" not in dumped
        assert secret not in str(dumped)

    async def test_scopes_kept_and_deduplicated(self, store: TenantStore) -> None:
        await store.create_tenant(TenantCreate(id="acme"))
        key, _ = await store.create_key("acme", scopes=["execute", "admin", "admin"])
        assert key.scopes == ["execute", "admin"]

    async def test_create_key_unknown_tenant(self, store: TenantStore) -> None:
        with pytest.raises(NotFound, match="tenant 'nobody' does not exist"):
            await store.create_key("nobody")

    async def test_lookup_by_hash(self, store: TenantStore) -> None:
        await store.create_tenant(TenantCreate(id="acme"))
        key, secret = await store.create_key("acme")
        found = await store.key_by_hash(hash_key(secret))
        assert found is not None
        assert found.id == key.id
        assert found.hash == key.hash
        assert await store.key_by_hash(hash_key(secret + "x")) is None

    async def test_list_keys(self, store: TenantStore) -> None:
        await store.create_tenant(TenantCreate(id="acme"))
        await store.create_tenant(TenantCreate(id="other"))
        first, _ = await store.create_key("acme", name="one")
        second, _ = await store.create_key("acme", name="two")
        await store.create_key("other")
        listed = await store.list_keys("acme")
        assert {k.id for k in listed} == {first.id, second.id}
        assert await store.list_keys("other") != []

    async def test_list_keys_unknown_tenant(self, store: TenantStore) -> None:
        with pytest.raises(NotFound):
            await store.list_keys("nobody")

    async def test_revoke(self, store: TenantStore) -> None:
        await store.create_tenant(TenantCreate(id="acme"))
        key, secret = await store.create_key("acme")
        revoked = await store.revoke_key(key.id)
        assert revoked.revoked
        assert not revoked.usable()
        stored = await store.key_by_hash(hash_key(secret))
        assert stored is not None
        assert stored.revoked
        assert [k.revoked for k in await store.list_keys("acme")] == [True]
        assert (await store.revoke_key(key.id)).revoked  # idempotent

    async def test_revoke_unknown(self, store: TenantStore) -> None:
        with pytest.raises(NotFound, match="key 'key_nope' does not exist"):
            await store.revoke_key("key_nope")


class TestRedisLayout:
    async def test_secret_is_never_stored(self, redis: Redis) -> None:
        store = RedisTenantStore(redis)
        await store.create_tenant(TenantCreate(id="acme"))
        key, secret = await store.create_key("acme", name="ci")
        dump = b""
        for name in await redis.keys("*"):
            kind = await redis.type(name)
            value = (
                await redis.get(name)
                if kind == b"string"
                else b" ".join(_bytes(member) for member in await redis.smembers(name))
            )
            dump += _bytes(name) + b"=" + _bytes(value) + b"\n"
        assert secret.encode() not in dump
        assert secret[12:].encode() not in dump
        assert (redis_keys.KEY + key.hash).encode() in dump

    async def test_every_change_is_published(self, redis: Redis) -> None:
        store = RedisTenantStore(redis)
        pubsub = redis.pubsub()
        await pubsub.subscribe(redis_keys.CHANNEL_INVALIDATE)
        await pubsub.get_message(timeout=1)  # the subscribe confirmation

        async def next_messages(count: int) -> list[str]:
            seen: list[str] = []
            async with asyncio.timeout(3):
                while len(seen) < count:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                    if message is not None:
                        seen.append(message["data"].decode())
            return seen

        await store.create_tenant(TenantCreate(id="acme"))
        assert await next_messages(1) == ["tenant:acme"]
        await store.update_tenant("acme", TenantUpdate(name="A"))
        assert await next_messages(1) == ["tenant:acme"]
        key, _ = await store.create_key("acme")
        assert await next_messages(1) == [f"key:{key.hash}"]
        await store.revoke_key(key.id)
        assert await next_messages(1) == [f"key:{key.hash}"]
        await store.delete_tenant("acme")
        assert await next_messages(2) == [f"key:{key.hash}", "tenant:acme"]
        await pubsub.aclose()  # type: ignore[no-untyped-call]  # untyped in redis-py

    async def test_concurrent_updates_all_land(self, redis: Redis) -> None:
        store = RedisTenantStore(redis)
        await store.create_tenant(TenantCreate(id="acme"))
        # Each update reads, changes one field and writes: WATCH makes a lost update retry.
        fields = [
            "max_run_timeout",
            "max_compile_timeout",
            "max_run_cpu_time",
            "max_compile_cpu_time",
            "max_run_memory_limit",
            "max_compile_memory_limit",
        ]
        clients = [Redis.from_url(_db_url_of(redis)) for _ in fields]
        try:
            await asyncio.gather(
                *(
                    RedisTenantStore(client).update_tenant(
                        "acme", TenantUpdate.model_validate({field: 1000 + i})
                    )
                    for i, (field, client) in enumerate(zip(fields, clients, strict=True))
                )
            )
        finally:
            for client in clients:
                await client.aclose()
        tenant = await store.get_tenant("acme")
        assert tenant is not None
        assert [getattr(tenant, field) for field in fields] == [1000 + i for i in range(6)]


def _db_url_of(redis: Redis) -> str:
    kwargs = redis.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs['db']}"


def _bytes(value: bytes | str | None) -> bytes:
    """A value as redis-py returns it without decode_responses (typed as bytes or str)."""
    assert isinstance(value, bytes)
    return value
