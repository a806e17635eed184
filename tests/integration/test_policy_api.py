"""Allow-lists and caps as a key holder sees them (issue 5), through the real engine."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import Gateway, GatewayFactory
from tests.fakes import FakePiston, serve_fake
from tests.support import Service

PY = {"language": "python", "version": "*", "files": [{"content": "print('hi')"}]}
BASH = {"language": "bash", "version": "*", "files": [{"content": "echo hi"}]}
DENIED = {"message": "language 'python' is not allowed for this key"}


class TestAllowList:
    @pytest.mark.parametrize(
        ("language", "version"), [("python", "*"), ("py", "*"), ("python3", "3.x"), ("py3", ">=3")]
    )
    async def test_refused_by_name_alias_and_selector(
        self, gateway: Gateway, language: str, version: str
    ) -> None:
        key = await gateway.tenant(allowed_languages=["bash"])
        response = await gateway.execute(key, {**PY, "language": language, "version": version})
        assert response.status_code == 403
        assert response.json() == DENIED

    async def test_allowed_language_runs(self, gateway: Gateway) -> None:
        key = await gateway.tenant(allowed_languages=["bash"])
        response = await gateway.execute(key, {**BASH, "language": "sh"})
        assert response.status_code == 200
        assert response.json()["run"]["stdout"] == "hi\n"

    async def test_star_allows_everything(self, gateway: Gateway) -> None:
        key = await gateway.tenant(allowed_languages=["*"])
        assert (await gateway.execute(key, PY)).status_code == 200
        assert (await gateway.execute(key, BASH)).status_code == 200

    async def test_global_list_narrows_the_tenants(self, make_gateway: GatewayFactory) -> None:
        gateway = await make_gateway(allowed_languages=["bash"])
        key = await gateway.tenant(allowed_languages=["*"])
        assert (await gateway.execute(key, PY)).json() == DENIED
        assert (await gateway.execute(key, BASH)).status_code == 200

    async def test_runtimes_lists_only_what_the_key_may_run(
        self, gateway: Gateway, engine: Service
    ) -> None:
        key = await gateway.tenant(allowed_languages=["bash", "python"])
        listed = (await gateway.client.get("/api/v2/runtimes", headers={"X-API-Key": key})).json()
        assert {rt["language"] for rt in listed} == {"bash", "python"}
        async with httpx.AsyncClient(timeout=5) as direct:
            everything = (await direct.get(f"{engine.url}/api/v2/runtimes")).json()
        assert len(everything) > len(listed)

    async def test_packages_hide_what_the_key_may_not_run(self, gateway: Gateway) -> None:
        key = await gateway.tenant(allowed_languages=["bash"])
        listed = (await gateway.client.get("/api/v2/packages", headers={"X-API-Key": key})).json()
        assert [pkg["language"] for pkg in listed] == ["bash"]


class TestCaps:
    async def _forwarded(
        self, make_gateway: GatewayFactory, tenant: dict[str, Any], body: dict[str, int]
    ) -> dict[str, int]:
        async with serve_fake(FakePiston()) as fake:
            gateway = await make_gateway(piston_urls=[fake.url])
            key = await gateway.tenant(**tenant)
            response = await gateway.execute(key, {**PY, **body})
            assert response.status_code == 200, response.text
            return dict(fake.bodies[-1])

    async def test_omitted_limits_take_the_tenants_caps(self, make_gateway: GatewayFactory) -> None:
        sent = await self._forwarded(
            make_gateway,
            {
                "max_run_timeout": 1500,
                "max_compile_timeout": 4000,
                "max_run_memory_limit": 64_000_000,
            },
            {},
        )
        assert sent["run_timeout"] == 1500
        assert sent["compile_timeout"] == 4000
        assert sent["run_memory_limit"] == 64_000_000
        assert sent["run_cpu_time"] == 3000  # the global maximum where the tenant sets none

    async def test_limits_under_the_cap_are_kept(self, make_gateway: GatewayFactory) -> None:
        sent = await self._forwarded(make_gateway, {"max_run_timeout": 1500}, {"run_timeout": 700})
        assert sent["run_timeout"] == 700

    @pytest.mark.parametrize(
        ("tenant", "body", "message"),
        [
            (
                {"max_run_timeout": 1500},
                {"run_timeout": 1501},
                "run_timeout cannot exceed the configured limit of 1500",
            ),
            (
                {"max_compile_cpu_time": 100},
                {"compile_cpu_time": 200},
                "compile_cpu_time cannot exceed the configured limit of 100",
            ),
            (
                {"max_run_memory_limit": 1000},
                {"run_memory_limit": 5000},
                "run_memory_limit cannot exceed the configured limit of 1000",
            ),
            ({}, {"run_timeout": -1}, "run_timeout must be non-negative"),
            ({}, {"run_memory_limit": "lots"}, "If specified, run_memory_limit must be a number"),
        ],
    )
    async def test_over_the_cap_is_400(
        self, gateway: Gateway, tenant: dict[str, Any], body: dict[str, object], message: str
    ) -> None:
        key = await gateway.tenant(**tenant)
        response = await gateway.execute(key, {**PY, **body})
        assert response.status_code == 400
        assert response.json() == {"message": message}

    async def test_a_tenant_cap_is_really_applied(self, gateway: Gateway) -> None:
        key = await gateway.tenant(max_run_timeout=300)
        slow = {**PY, "files": [{"content": "import time\ntime.sleep(5)"}]}
        response = await gateway.execute(key, slow)
        assert response.status_code == 200
        assert response.json()["run"]["status"] == "TO"
