"""Rate limits, concurrency caps, quotas, overload and Redis outages as a client sees them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from tests.conftest import ADMIN_KEY, Gateway, GatewayFactory
from tests.fakes import FakePiston, serve_fake
from tests.support import RedisServer

PY = {"language": "python", "version": "*", "files": [{"content": "print('hi')"}]}
SLOW = {"language": "python", "version": "*", "files": [{"content": "import time\ntime.sleep(1)"}]}
NO_STORE = {"Cache-Control": "no-store"}


class TestRateLimit:
    async def test_headers_count_down_then_429(self, gateway: Gateway) -> None:
        key = await gateway.tenant(rate_limit="3/minute")
        seen = []
        for _ in range(3):
            response = await gateway.execute(key, PY)
            assert response.status_code == 200
            seen.append(response.headers["x-ratelimit-remaining"])
            assert response.headers["x-ratelimit-limit"] == "3"
            assert response.headers["ratelimit-policy"] == '"default";q=3;w=60'
        assert seen == ["2", "1", "0"]
        refused = await gateway.execute(key, PY)
        assert refused.status_code == 429
        assert "3 per 1 minute" in refused.json()["message"]
        assert refused.headers["x-ratelimit-remaining"] == "0"
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        reset = int(refused.headers["x-ratelimit-reset"])
        assert time.time() - 1 <= reset <= time.time() + 61
        assert refused.headers["ratelimit"].startswith('"default";r=0;t=')

    async def test_default_limit_applies(self, make_gateway: GatewayFactory) -> None:
        gateway = await make_gateway(default_rate_limit="2/minute")
        key = await gateway.tenant()
        statuses = [(await gateway.execute(key, PY)).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]

    async def test_tenants_are_limited_separately(self, gateway: Gateway) -> None:
        acme = await gateway.tenant("acme", rate_limit="1/minute")
        globex = await gateway.tenant("globex", rate_limit="1/minute")
        assert (await gateway.execute(acme, PY)).status_code == 200
        assert (await gateway.execute(acme, PY)).status_code == 429
        assert (await gateway.execute(globex, PY)).status_code == 200

    async def test_several_windows(self, gateway: Gateway) -> None:
        key = await gateway.tenant(rate_limit="100/second;2/hour")
        statuses = [(await gateway.execute(key, PY)).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]


class TestConcurrencyAndQuota:
    async def test_concurrency_cap(self, gateway: Gateway) -> None:
        key = await gateway.tenant(max_concurrency=2, rate_limit="100/minute")
        bodies = [{**SLOW, "stdin": str(i)} for i in range(3)]  # distinct: no single-flight
        answers = await asyncio.gather(*(gateway.execute(key, b, **NO_STORE) for b in bodies))
        statuses = sorted(a.status_code for a in answers)
        assert statuses == [200, 200, 429]
        refused = next(a for a in answers if a.status_code == 429)
        assert "concurrency" in refused.json()["message"]
        # The slots come back: the next one runs.
        assert (await gateway.execute(key, PY)).status_code == 200

    async def test_daily_quota(self, gateway: Gateway) -> None:
        key = await gateway.tenant(daily_quota=2, rate_limit="100/minute")
        assert (await gateway.execute(key, PY)).status_code == 200
        assert (await gateway.execute(key, PY)).headers["x-cache"] == "HIT"  # hits count too
        refused = await gateway.execute(key, PY)
        assert refused.status_code == 429
        assert "daily quota of 2" in refused.json()["message"]
        assert "T00:00:00Z" in refused.json()["message"]

    async def test_gateway_overload_is_503(self, make_gateway: GatewayFactory) -> None:
        async with serve_fake(FakePiston(delay=1.0)) as fake:
            gateway = await make_gateway(
                piston_urls=[fake.url], max_concurrency=1, max_queue=0, queue_timeout_ms=100
            )
            key = await gateway.tenant(rate_limit="100/minute")
            bodies = [{**PY, "stdin": str(i)} for i in range(2)]
            answers = await asyncio.gather(*(gateway.execute(key, b, **NO_STORE) for b in bodies))
            assert sorted(a.status_code for a in answers) == [200, 503]
            overloaded = next(a for a in answers if a.status_code == 503)
            assert int(overloaded.headers["retry-after"]) >= 1
            assert set(overloaded.json()) == {"message"}


class TestUsage:
    async def test_usage_after_a_known_sequence(self, gateway: Gateway) -> None:
        key = await gateway.tenant(rate_limit="4/minute")
        await gateway.execute(key, PY)  # run
        await gateway.execute(key, PY)  # hit
        await gateway.execute(
            key, {**PY, "files": [{"content": "import time; time.sleep(0.1)"}]}
        )  # run
        await gateway.execute(key, {**PY, "language": "cobol"})  # 400: never reaches the limiter
        await gateway.execute(key, {**PY, "stdin": "x"})  # run
        await gateway.execute(key, PY)  # 429
        usage = await gateway.client.get(
            "/admin/tenants/acme/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        )
        assert usage.status_code == 200
        today = usage.json()["days"][0]
        assert usage.json()["tenant"] == "acme"
        assert today["date"] == time.strftime("%Y-%m-%d", time.gmtime())
        assert (
            today["executions"],
            today["cache_hits"],
            today["rate_limited"],
            today["errors"],
        ) == (4, 1, 1, 0)
        assert today["cpu_time_ms"] > 0
        assert today["wall_time_ms"] >= 100
        assert all(day["executions"] == 0 for day in usage.json()["days"][1:])


class TestRedisOutage:
    @pytest.fixture
    async def own_redis(self) -> AsyncIterator[RedisServer]:
        server = RedisServer()
        server.start()
        yield server
        server.stop()

    async def _gateway(
        self, make_gateway: GatewayFactory, redis: RedisServer, **extra: Any
    ) -> tuple[Gateway, str]:
        gateway = await make_gateway(redis_url=redis.url, **extra)
        key = await gateway.tenant(rate_limit="100/minute")
        assert (await gateway.execute(key, PY)).status_code == 200  # key now in the key cache
        # Saved, so that the restarted server (same port, same dir) still knows the key.
        saver = Redis.from_url(redis.url)
        await saver.save()
        await saver.aclose()
        return gateway, key

    async def _recovered(self, gateway: Gateway, key: str) -> httpx.Response:
        """The first answer counted in Redis again, within the contract's 5 s."""
        async with asyncio.timeout(5):
            while True:
                back = await gateway.execute(key, {**PY, "stdin": "2"})
                if back.status_code != 503 and back.headers.get("x-cache") != "BYPASS":
                    return back
                await asyncio.sleep(0.05)

    async def test_fail_closed_then_recovers(
        self, make_gateway: GatewayFactory, own_redis: RedisServer
    ) -> None:
        gateway, key = await self._gateway(make_gateway, own_redis)
        own_redis.stop()
        down = await gateway.execute(key, {**PY, "stdin": "1"})
        assert down.status_code == 503
        assert "Redis" in down.json()["message"]
        assert (await gateway.client.get("/healthz")).status_code == 200
        assert (await gateway.client.get("/readyz")).status_code == 503
        own_redis.start()
        back = await self._recovered(gateway, key)
        assert back.status_code == 200
        assert back.headers["x-cache"] == "MISS"

    async def test_fail_open_serves_without_limits(
        self, make_gateway: GatewayFactory, own_redis: RedisServer
    ) -> None:
        gateway, key = await self._gateway(make_gateway, own_redis, rate_limit_fail_open=True)
        own_redis.stop()
        served = await gateway.execute(key, {**PY, "stdin": "1"})
        assert served.status_code == 200
        assert served.json()["run"]["stdout"] == "hi\n"
        assert served.headers["x-cache"] == "BYPASS"
        assert "x-ratelimit-limit" not in served.headers  # nothing was counted
        own_redis.start()
        back = await self._recovered(gateway, key)
        assert back.status_code == 200
        assert back.headers["x-ratelimit-limit"] == "100"

    async def test_admin_api_and_unseen_keys_are_503(
        self, make_gateway: GatewayFactory, own_redis: RedisServer
    ) -> None:
        gateway, _ = await self._gateway(make_gateway, own_redis, rate_limit_fail_open=True)
        unseen = await gateway.tenant("fresh")  # minted, never used: not in the key cache
        own_redis.stop()
        admin = {"X-API-Key": ADMIN_KEY}
        for method, path in [
            ("GET", "/admin/tenants"),
            ("GET", "/admin/tenants/fresh"),
            ("PATCH", "/admin/tenants/fresh"),
            ("POST", "/admin/tenants/fresh/keys"),
            ("GET", "/admin/tenants/fresh/usage"),
        ]:
            answer = await gateway.client.request(method, path, headers=admin, json={})
            assert answer.status_code == 503, (path, answer.text)
            assert "Redis" in answer.json()["message"]
            assert int(answer.headers["retry-after"]) >= 1
        refused = await gateway.execute(unseen, PY)  # cannot be checked: 503, never 401
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["retry-after"]) >= 1


class TestFailedAuthentication:
    async def test_a_guessing_loop_gets_429(self, make_gateway: GatewayFactory) -> None:
        gateway = await make_gateway(auth_failure_rate_limit="3/minute")
        statuses = []
        for i in range(5):
            response = await gateway.client.post(
                "/api/v2/execute", json=PY, headers={"Authorization": f"Bearer pgw_guess{i}"}
            )
            statuses.append(response.status_code)
        assert statuses[:3] == [401, 401, 401]
        assert statuses[-1] == 429
