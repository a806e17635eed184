from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis

from app.clock import SYSTEM_CLOCK, Clock
from app.settings import Settings
from app.tenancy.models import TenantCreate
from tests.support import RedisServer, Service, start_engine


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """The suite's own redis-server on a free port (never the machine's 6379)."""
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """A client of the suite's Redis, on a flushed database: the one Redis client fixture.

    Generous timeouts: the tests using it count things, and 60 connections opened at once on a
    loaded 2-core machine can take longer than the app's outage-detecting 0.5 s (the outage
    behaviour has its own tests, on servers of their own, in test_limits_outage.py).
    """
    client = Redis.from_url(redis_server.url, socket_connect_timeout=5.0, socket_timeout=5.0)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def engine() -> Iterator[Service]:
    """The embedded engine as a real process: every execution in the suite runs real code."""
    service = start_engine()
    yield service
    service.stop()


# ---------------------------------------------------------------------------------------------
# In-process gateways (create_app + lifespan + ASGITransport) on the suite's Redis and engine.

ADMIN_KEY = "pgw_test_admin_key_0123456789abcdefghijklmnopqrstuvwxyz"


@dataclass
class Gateway:
    app: FastAPI
    client: httpx.AsyncClient
    state: Any  # app.state.AppState

    async def tenant(self, tenant_id: str = "acme", **fields: Any) -> str:
        """Create a tenant and mint an execute key for it; returns the key."""
        await self.state.store.create_tenant(TenantCreate(id=tenant_id, **fields))
        _, key = await self.state.store.create_key(
            tenant_id, name="test", scopes=["execute"], expires_at=None
        )
        assert isinstance(key, str)
        return key

    async def execute(self, key: str, body: dict[str, Any], **headers: str) -> httpx.Response:
        return await self.client.post(
            "/api/v2/execute", json=body, headers={"Authorization": f"Bearer {key}", **headers}
        )


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def make_gateway(redis_server: RedisServer, engine: Service) -> AsyncIterator[GatewayFactory]:
    """Build gateways with their own settings over a flushed Redis; closes them after the test."""
    flusher = Redis.from_url(redis_server.url)
    await flusher.flushall()
    await flusher.aclose()
    async with AsyncExitStack() as stack:

        async def make(
            *, transport: Any = None, clock: Clock = SYSTEM_CLOCK, **overrides: Any
        ) -> Gateway:
            from app.main import create_app  # imported late: unit tests need none of it

            values: dict[str, Any] = {
                "piston_urls": [engine.url],
                "redis_url": redis_server.url,
                "admin_key": ADMIN_KEY,
                **overrides,
            }
            app = create_app(Settings(**values), upstream_transport=transport, clock=clock)
            await stack.enter_async_context(app.router.lifespan_context(app))
            client = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60
            )
            await stack.enter_async_context(client)
            return Gateway(app, client, app.state.gateway)

        yield make


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway()
