"""The Piston-compatible routes, end to end: gateway -> the embedded engine (real code)."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_KEY, Gateway, GatewayFactory
from tests.fakes import FakePiston, serve_fake
from tests.programs import HELLO, hello_body
from tests.support import Service, engine_jobs, free_port

PY = {"language": "python", "version": "*", "files": [{"content": "print('hi')"}]}
VOLATILE = ("cpu_time", "wall_time", "memory")


def _stable(answer: dict[str, Any]) -> dict[str, Any]:
    """The answer without the figures that differ from run to run."""
    return {
        key: {k: v for k, v in value.items() if k not in VOLATILE}
        if isinstance(value, dict)
        else value
        for key, value in answer.items()
    }


def _engine_languages(engine: Service) -> list[str]:
    listed = httpx.get(f"{engine.url}/api/v2/runtimes", timeout=5).json()
    return sorted({rt["language"] for rt in listed} & set(HELLO))


class TestExecute:
    async def test_runs_real_code(self, gateway: Gateway) -> None:
        key = await gateway.tenant()
        response = await gateway.execute(key, PY)
        assert response.status_code == 200, response.text
        assert response.json()["run"]["stdout"] == "hi\n"
        assert response.json()["language"] == "python"
        assert response.headers["x-cache"] in ("MISS", "BYPASS")
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])

    async def test_request_id_is_echoed(self, gateway: Gateway) -> None:
        key = await gateway.tenant()
        response = await gateway.execute(key, PY, **{"X-Request-ID": "trace-42"})
        assert response.headers["x-request-id"] == "trace-42"

    async def test_same_answer_as_the_engine(self, gateway: Gateway, engine: Service) -> None:
        key = await gateway.tenant()
        for language in _engine_languages(engine):
            body = hello_body(language)
            async with httpx.AsyncClient(timeout=60) as direct_client:
                direct = (
                    await direct_client.post(f"{engine.url}/api/v2/execute", json=body)
                ).json()
            through = await gateway.execute(key, body, **{"Cache-Control": "no-store"})
            assert through.status_code == 200, (language, through.text)
            assert _stable(through.json()) == _stable(direct), language
            assert through.json()["run"]["stdout"] == "hello world a b\n", language

    @pytest.mark.parametrize(
        ("language", "version"), [("py", "3.x"), ("python3", "*"), ("py3", "3")]
    )
    async def test_aliases_and_selectors(
        self, gateway: Gateway, language: str, version: str
    ) -> None:
        key = await gateway.tenant()
        response = await gateway.execute(key, {**PY, "language": language, "version": version})
        assert response.status_code == 200, response.text
        assert response.json()["language"] == "python"

    async def test_trailing_slash_without_redirect(self, gateway: Gateway) -> None:
        key = await gateway.tenant()
        response = await gateway.client.post(
            "/api/v2/execute/", json=PY, headers={"Authorization": f"Bearer {key}"}
        )
        assert response.status_code == 200
        runtimes = await gateway.client.get(
            "/api/v2/runtimes/", headers={"Authorization": f"Bearer {key}"}
        )
        assert runtimes.status_code == 200

    async def test_unknown_runtime_never_reaches_the_engine(
        self, gateway: Gateway, engine: Service
    ) -> None:
        key = await gateway.tenant()
        before = engine_jobs(engine)
        response = await gateway.execute(key, {**PY, "language": "cobol", "version": "9.x"})
        assert response.status_code == 400
        assert response.json() == {"message": "cobol-9.x runtime is unknown"}
        assert engine_jobs(engine) == before


class TestBadInput:
    async def test_not_json(self, gateway: Gateway) -> None:
        key = await gateway.tenant()
        response = await gateway.client.post(
            "/api/v2/execute",
            content=b"language=python",
            headers={
                "Authorization": f"Bearer {key}",
                "Content-Type": "application/x-www-form-urlencoded",
            },
        )
        assert response.status_code == 415
        assert response.json() == {"message": "requests must be of type application/json"}

    async def test_malformed_json(self, gateway: Gateway) -> None:
        key = await gateway.tenant()
        response = await gateway.client.post(
            "/api/v2/execute",
            content=b'{"language": ',
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        assert response.status_code == 400
        assert response.json() == {"message": "request body is not valid JSON"}

    async def test_body_too_large(self, make_gateway: GatewayFactory) -> None:
        gateway = await make_gateway(max_body_bytes=1000)
        key = await gateway.tenant()
        response = await gateway.execute(key, {**PY, "stdin": "x" * 2000})
        assert response.status_code == 413
        assert "1000 bytes" in response.json()["message"]

    async def test_too_many_files(self, make_gateway: GatewayFactory) -> None:
        gateway = await make_gateway(max_files=2)
        key = await gateway.tenant()
        response = await gateway.execute(key, {**PY, "files": [{"content": "x"}] * 3})
        assert response.status_code == 400
        assert response.json() == {"message": "files cannot hold more than 2 files"}

    @pytest.mark.parametrize(
        ("change", "message"),
        [
            ({"language": None}, "language is required as a string"),
            ({"version": 3}, "version is required as a string"),
            ({"files": {}}, "files is required as an array"),
            (
                {"files": [{"name": "../../etc/x", "content": "x"}]},
                "files[0].name must be a relative path",
            ),
            (
                {"files": [{"name": "/abs", "content": "x"}]},
                "files[0].name must be a relative path",
            ),
            (
                {"files": [{"content": "@@", "encoding": "base64"}]},
                "files[0].content is not valid base64",
            ),
            (
                {"files": [{"content": "x", "encoding": "utf16"}]},
                "files[0].encoding must be one of",
            ),
            ({"args": "x"}, "args must be an array of strings"),
            ({"stdin": ["x"]}, "stdin must be a string"),
            ({"run_timeout": "fast"}, "If specified, run_timeout must be a number"),
            ({"run_timeout": 999999}, "run_timeout cannot exceed the configured limit of 3000"),
            ({"compile_timeout": -4}, "compile_timeout must be non-negative"),
        ],
    )
    async def test_piston_400s(
        self, gateway: Gateway, change: dict[str, Any], message: str
    ) -> None:
        key = await gateway.tenant()
        response = await gateway.execute(key, {**PY, **change})
        assert response.status_code == 400
        assert response.json()["message"].startswith(message)
        assert set(response.json()) == {"message"}

    @pytest.mark.parametrize(
        ("change", "message"),
        [
            ({"language": "python\x00"}, "language must not contain a NUL character"),
            ({"version": "*\x00"}, "version must not contain a NUL character"),
            (
                {"files": [{"name": "m\x00.py", "content": "x"}]},
                "files[0].name must not contain a NUL character",
            ),
            ({"args": ["a", "\x00"]}, "args[1] must not contain a NUL character"),
            (
                {"run_memory_limit": 2**63},
                "If specified, run_memory_limit must be at most 9007199254740991 (2^53 - 1)",
            ),
            (
                {"compile_memory_limit": 2**53},
                "If specified, compile_memory_limit must be at most 9007199254740991 (2^53 - 1)",
            ),
            ({"run_memory_limit": False}, "If specified, run_memory_limit must be a number"),
            (
                {"files": [{"content": "print(1)", "encoding": {}}]},
                "files[0].encoding must be one of utf8, base64, hex",
            ),
            (
                {"files": [{"content": "print(1)", "encoding": ""}]},
                "files[0].encoding must be one of utf8, base64, hex",
            ),
        ],
    )
    async def test_hostile_fields_never_reach_the_upstream(
        self, gateway: Gateway, engine: Service, change: dict[str, Any], message: str
    ) -> None:
        key = await gateway.tenant()
        jobs_before = engine_jobs(engine)
        response = await gateway.execute(key, {**PY, **change})
        assert response.status_code == 400, response.text
        assert response.json() == {"message": message}
        assert engine_jobs(engine) == jobs_before

    async def test_nul_in_stdin_and_content_is_passed_through(self, gateway: Gateway) -> None:
        key = await gateway.tenant()
        program = "import sys; print(repr(sys.stdin.read()), repr(open('data').read()))"
        files = [{"content": program}, {"name": "data", "content": "a\x00b"}]
        response = await gateway.execute(key, {**PY, "files": files, "stdin": "x\x00y\n"})
        assert response.status_code == 200, response.text
        assert response.json()["run"]["stdout"] == "'x\\x00y\\n' 'a\\x00b'\n"


class TestRuntimesAndPackages:
    async def test_runtimes(self, gateway: Gateway, engine: Service) -> None:
        key = await gateway.tenant()
        response = await gateway.client.get("/api/v2/runtimes", headers={"X-API-Key": key})
        assert response.status_code == 200
        async with httpx.AsyncClient(timeout=5) as direct_client:
            direct = (await direct_client.get(f"{engine.url}/api/v2/runtimes")).json()
        assert response.json() == direct

    async def test_packages_listing_any_key(self, gateway: Gateway) -> None:
        key = await gateway.tenant()
        response = await gateway.client.get("/api/v2/packages", headers={"X-API-Key": key})
        assert response.status_code == 200
        listed = response.json()
        assert listed
        assert all(set(pkg) == {"language", "language_version", "installed"} for pkg in listed)
        assert "python" in {pkg["language"] for pkg in listed}

    async def test_package_install_needs_admin(self, gateway: Gateway) -> None:
        key = await gateway.tenant()
        body = {"language": "python", "version": "3.12.0"}
        refused = await gateway.client.post(
            "/api/v2/packages", json=body, headers={"X-API-Key": key}
        )
        assert refused.status_code == 403
        # With the admin key it reaches the engine, which installs nothing (501 -> 502).
        admin = await gateway.client.post(
            "/api/v2/packages", json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        )
        assert admin.status_code == 502
        assert admin.json()["message"].startswith("the upstream failed with status 501")


class TestUpstreamFaults:
    async def _through(
        self, make_gateway: GatewayFactory, fake: FakePiston, **body: Any
    ) -> httpx.Response:
        async with serve_fake(fake):
            gateway = await make_gateway(piston_urls=[fake.url], upstream_grace_ms=300)
            key = await gateway.tenant()
            return await gateway.execute(key, {**PY, **body}, **{"Cache-Control": "no-store"})

    @pytest.mark.parametrize(
        ("mode", "status", "message"),
        [
            ("500", 502, "the upstream failed with status 500"),
            ("garbage", 502, "the upstream answered with something that is not JSON"),
            ("no-run", 502, "the upstream answered without a run stage"),
            ("400-message", 400, "run_timeout cannot exceed the configured limit of 3000"),
            ("413-trace", 413, "the upstream refused the request with status 413"),
        ],
    )
    async def test_fault_answers(
        self, make_gateway: GatewayFactory, mode: str, status: int, message: str
    ) -> None:
        response = await self._through(make_gateway, FakePiston(mode=mode))
        assert response.status_code == status
        assert response.json() == {"message": message}

    async def test_hang_is_504(self, make_gateway: GatewayFactory) -> None:
        fake = FakePiston(mode="hang")
        response = await self._through(make_gateway, fake, run_timeout=200, compile_timeout=100)
        assert response.status_code == 504
        assert set(response.json()) == {"message"}

    @pytest.mark.parametrize(("mode", "status"), [("500", 502), ("garbage", 502), ("hang", 504)])
    async def test_a_failed_upstream_counts_as_an_error_in_usage(
        self, make_gateway: GatewayFactory, mode: str, status: int
    ) -> None:
        async with serve_fake(FakePiston(mode=mode)) as fake:
            gateway = await make_gateway(piston_urls=[fake.url], upstream_grace_ms=100)
            key = await gateway.tenant()
            body = {**PY, "run_timeout": 200, "compile_timeout": 100}
            assert (await gateway.execute(key, body)).status_code == status
            usage = await gateway.client.get(
                "/admin/tenants/acme/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
            )
        today = usage.json()["days"][0]
        assert (today["executions"], today["errors"]) == (1, 1)

    async def test_unreachable_is_503(self, make_gateway: GatewayFactory) -> None:
        gateway = await make_gateway(piston_urls=[f"http://127.0.0.1:{free_port()}"])
        key = await gateway.tenant()
        response = await gateway.execute(key, PY)
        assert response.status_code == 503
        assert set(response.json()) == {"message"}

    async def test_slow_upstream_does_not_block_healthz(self, make_gateway: GatewayFactory) -> None:
        async with serve_fake(FakePiston(mode="hang")) as fake:
            gateway = await make_gateway(piston_urls=[fake.url])
            key = await gateway.tenant()
            slow = asyncio.create_task(gateway.execute(key, PY))
            while fake.executions == 0:  # noqa: ASYNC110  # wait until the upstream holds it
                await asyncio.sleep(0.01)
            health = await gateway.client.get("/healthz")
            assert health.status_code == 200
            assert not slow.done()  # the health answer came while the execute still hung
            slow.cancel()

    async def test_runs_on_the_healthy_upstream(self, make_gateway: GatewayFactory) -> None:
        async with serve_fake(FakePiston()) as fake:
            dead = f"http://127.0.0.1:{free_port()}"
            gateway = await make_gateway(piston_urls=[dead, fake.url])
            key = await gateway.tenant()
            response = await gateway.execute(key, PY)
            assert response.status_code == 200
            assert fake.executions == 1

    async def test_forwards_the_resolved_runtime(self, make_gateway: GatewayFactory) -> None:
        async with serve_fake(FakePiston()) as fake:
            gateway = await make_gateway(piston_urls=[fake.url])
            key = await gateway.tenant()
            await gateway.execute(key, {**PY, "language": "py", "version": "3.x"})
            sent = fake.bodies[-1]
            assert (sent["language"], sent["version"]) == ("python", "3.12.0")
            assert sent["run_timeout"] == 3000
            assert sent["compile_timeout"] == 10000


class TestOperations:
    async def test_readyz(self, gateway: Gateway) -> None:
        response = await gateway.client.get("/readyz")
        assert response.status_code == 200
        body = response.json()
        assert body["status"] == "ok"
        assert body["redis"]["ok"] is True
        assert body["upstreams"][0]["healthy"] is True
        assert body["upstreams"][0]["in_flight"] == 0

    async def test_readyz_without_upstream(self, make_gateway: GatewayFactory) -> None:
        gateway = await make_gateway(piston_urls=[f"http://127.0.0.1:{free_port()}"])
        response = await gateway.client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["status"] == "unavailable"

    async def test_metrics(self, gateway: Gateway) -> None:
        key = await gateway.tenant()
        await gateway.execute(key, PY)
        text = (await gateway.client.get("/metrics")).text
        for family in (
            "pgw_requests_total",
            "pgw_execute_duration_seconds",
            "pgw_cache_total",
            "pgw_rejected_total",
            "pgw_executions_in_flight",
            "pgw_tenant_executions_total",
        ):
            assert family in text
        assert 'pgw_tenant_executions_total{tenant="acme"} 1.0' in text

    async def test_cors_exposes_the_gateway_headers(self, make_gateway: GatewayFactory) -> None:
        gateway = await make_gateway(cors_origins=["https://ide.example"])
        key = await gateway.tenant()
        preflight = await gateway.client.options(
            "/api/v2/execute",
            headers={
                "Origin": "https://ide.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://ide.example"
        answer = await gateway.execute(key, PY, Origin="https://ide.example")
        exposed = {
            h.strip().lower() for h in answer.headers["access-control-expose-headers"].split(",")
        }
        assert {
            "x-cache",
            "x-request-id",
            "x-ratelimit-remaining",
            "ratelimit",
            "retry-after",
        } <= exposed
        stranger = await gateway.execute(key, PY, Origin="https://evil.example")
        assert "access-control-allow-origin" not in stranger.headers

    async def test_an_unexpected_error_is_a_plain_500(
        self, gateway: Gateway, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        key = await gateway.tenant()

        def broken(language: str, selector: str) -> None:
            raise RuntimeError("internal detail /srv/secret")

        monkeypatch.setattr(gateway.state.catalog, "resolve", broken)
        response = await gateway.execute(key, PY)
        assert response.status_code == 500
        assert response.json() == {"message": "internal error"}
        assert response.headers["x-request-id"]

    async def test_docs_offline(self, gateway: Gateway) -> None:
        docs = await gateway.client.get("/docs")
        assert docs.status_code == 200
        assert "cdn" not in docs.text.lower()
        redoc = await gateway.client.get("/redoc")
        assert redoc.status_code == 200
        assert "cdn" not in redoc.text.lower()
        schema = (await gateway.client.get("/openapi.json")).json()
        assert set(schema["components"]["securitySchemes"]) == {"bearer", "apiKey"}
        execute = schema["paths"]["/api/v2/execute"]["post"]
        assert {"400", "401", "403", "413", "415", "429", "502", "503", "504"} <= set(
            execute["responses"]
        )
        every_status = {
            status
            for operations in schema["paths"].values()
            for operation in operations.values()
            for status in operation["responses"]
        }
        assert "422" not in every_status  # validation errors are 400 {"message"}


class TestOverload:
    async def test_a_burst_past_the_queue_is_refused_at_once(
        self, make_gateway: GatewayFactory
    ) -> None:
        """Contract: past the queue, 503 within 100 ms. Before: a burst of 50 took 73-143 ms
        each (every refusal paid its body, its admission and the single-flight lock first)."""
        async with serve_fake(FakePiston(delay=5.0)) as fake:
            gateway = await make_gateway(piston_urls=[fake.url], max_concurrency=1, max_queue=1)
            key = await gateway.tenant(rate_limit="1000/minute", max_concurrency=100)
            held = [
                asyncio.create_task(gateway.execute(key, {**PY, "stdin": str(i)})) for i in (1, 2)
            ]
            async with asyncio.timeout(10):
                while (gateway.state.slots.in_flight, gateway.state.slots.waiting) != (1, 1):  # noqa: ASYNC110
                    await asyncio.sleep(0.01)

            async def timed(i: int) -> tuple[httpx.Response, float]:
                started = asyncio.get_running_loop().time()
                response = await gateway.execute(key, {**PY, "stdin": f"burst {i}"})
                return response, asyncio.get_running_loop().time() - started

            answers = await asyncio.gather(*(timed(i) for i in range(50)))
            for task in held:
                task.cancel()
            await asyncio.gather(*held, return_exceptions=True)
        assert [r.status_code for r, _ in answers] == [503] * 50
        assert all(
            r.json() == {"message": "the gateway is at capacity; retry shortly"} for r, _ in answers
        )
        assert all(r.headers["retry-after"] == "1" for r, _ in answers)
        slowest = max(took for _, took in answers)
        assert slowest < 0.1, f"the slowest 503 took {slowest * 1000:.0f} ms"
        assert fake.executions == 1  # the one holding the slot; no refused one went up

    async def test_a_burst_from_idle_takes_only_the_slots_and_the_queue(
        self, make_gateway: GatewayFactory
    ) -> None:
        """Places are taken at entry: of 60 requests arriving together at 1 slot + 1 queue
        place, 58 are refused at once, before any of them paid for its admission."""
        async with serve_fake(FakePiston(delay=1.0)) as fake:
            gateway = await make_gateway(piston_urls=[fake.url], max_concurrency=1, max_queue=1)
            key = await gateway.tenant(rate_limit="1000/minute", max_concurrency=100)
            # The key known to the process first (its first lookup is a Redis round trip).
            await gateway.client.get("/api/v2/runtimes", headers={"X-API-Key": key})
            loop = asyncio.get_running_loop()

            async def timed(i: int) -> tuple[int, float]:
                started = loop.time()
                response = await gateway.execute(key, {**PY, "stdin": f"idle burst {i}"})
                return response.status_code, loop.time() - started

            answers = await asyncio.gather(*(timed(i) for i in range(60)))
        assert sorted(status for status, _ in answers) == [200, 200] + [503] * 58
        refused = [took for status, took in answers if status == 503]
        assert max(refused) < 0.1, f"the slowest 503 took {max(refused) * 1000:.0f} ms"
        assert fake.executions == 2
        assert gateway.state.slots.reserved == 0
