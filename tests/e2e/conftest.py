from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.support import RedisServer, Service, start_gateway

E2E_ADMIN_KEY = "pgw_e2e_admin_key_for_two_gateway_processes_0123456789"


@pytest.fixture
def replicas(redis_server: RedisServer, engine: Service) -> Iterator[list[Service]]:
    """Two `piston-gateway serve` processes on one (flushed) Redis and the engine."""
    redis.Redis.from_url(redis_server.url).flushall()
    started = [
        start_gateway(redis_url=redis_server.url, piston_url=engine.url, admin_key=E2E_ADMIN_KEY)
        for _ in range(2)
    ]
    yield started
    for service in started:
        service.stop()
