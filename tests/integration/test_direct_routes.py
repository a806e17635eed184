"""The hot path's direct route (app.middleware.DirectRoutes): execute skips FastAPI's routing,
and nothing a client can see tells the two ways apart.

Each case is sent twice, to two tenants alike in everything: once the way the app serves it (the
direct route) and once through the full FastAPI stack the app would otherwise use. Status, body
and headers must be the same, but for what differs between any two requests (the request id,
the date, the seconds left in a window).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from app.middleware import DirectRoutes
from tests.conftest import ADMIN_KEY, Gateway

PY = {"language": "python", "version": "*", "files": [{"content": "print('direct')"}]}
APP = "https://app.example.com"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
# What differs between any two requests, whichever way they are served.
_VOLATILE_HEADERS = {"x-request-id", "date", "x-ratelimit-reset", "ratelimit", "content-length"}
_VOLATILE_FIELDS = {"cpu_time", "wall_time", "memory"}


async def _stack(gateway: Gateway) -> DirectRoutes:
    await gateway.client.get("/healthz")  # the app builds its stack at its first request
    stack = gateway.app.middleware_stack
    assert isinstance(stack, DirectRoutes)
    return stack


def _full_stack_client(gateway: Gateway, stack: DirectRoutes) -> httpx.AsyncClient:
    """A client of the FastAPI stack alone: what the app serves when a route is not direct."""

    async def full(scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = gateway.app  # as Starlette's __call__ sets it before its stack
        await stack.full(scope, receive, send)

    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=full), base_url="http://test", timeout=60
    )


def _seen(response: httpx.Response) -> tuple[int, Any, dict[str, str]]:
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    if isinstance(body, dict):
        body = {
            k: {f: v for f, v in value.items() if f not in _VOLATILE_FIELDS}
            if isinstance(value, dict)
            else value
            for k, value in body.items()
        }
    headers = {k: v for k, v in response.headers.items() if k not in _VOLATILE_HEADERS}
    return response.status_code, body, headers


async def _tenant_with_keys(gateway: Gateway, tenant_id: str, **fields: Any) -> dict[str, str]:
    created = await gateway.client.post(
        "/admin/tenants", json={"id": tenant_id, **fields}, headers=ADMIN
    )
    assert created.status_code == 201, created.text
    keys = {}
    for name, body in {
        "execute": {"scopes": ["execute"]},
        "admin_only": {"scopes": ["admin"]},
        "browser": {"scopes": ["execute"], "allowed_origins": [APP]},
    }.items():
        minted = await gateway.client.post(
            f"/admin/tenants/{tenant_id}/keys", json={"name": name, **body}, headers=ADMIN
        )
        assert minted.status_code == 201, minted.text
        keys[name] = minted.json()["key"]
    return keys


Send_ = Callable[[httpx.AsyncClient, dict[str, str]], Awaitable[httpx.Response]]


def _post(
    path: str = "/api/v2/execute",
    *,
    key: str | None = "execute",
    headers: dict[str, str] | None = None,
    **kw: Any,
) -> Send_:
    async def send(client: httpx.AsyncClient, keys: dict[str, str]) -> httpx.Response:
        sent = dict(headers or {})
        if key is not None:
            sent["Authorization"] = f"Bearer {keys.get(key, key)}"
        body = kw if "content" in kw or "json" in kw else {"json": PY, **kw}
        return await client.post(path, headers=sent, **body)

    return send


def _two_keys(first: str, second: str) -> Send_:
    """Two Authorization lines: whichever way, the first one is the key."""

    async def send(client: httpx.AsyncClient, keys: dict[str, str]) -> httpx.Response:
        lines = [
            ("Authorization", f"Bearer {keys.get(first, first)}"),
            ("Authorization", f"Bearer {keys.get(second, second)}"),
            ("Cache-Control", "no-cache"),
            ("Cache-Control", "no-store"),
        ]
        return await client.post("/api/v2/execute", json=PY, headers=lines)

    return send


CASES: dict[str, Send_] = {
    "two keys, the good one first": _two_keys("execute", "pgw_" + "y" * 43),
    "two keys, the good one second": _two_keys("pgw_" + "y" * 43, "execute"),
    "a run": _post(),
    "a run, trailing slash": _post("/api/v2/execute/"),
    "no key": _post(key=None),
    "an unknown key": _post(key="pgw_" + "x" * 43),
    "a key without the execute scope": _post(key="admin_only"),
    "not JSON": _post(content=b"print(1)", headers={"Content-Type": "text/plain"}),
    "broken JSON": _post(content=b"{", headers={"Content-Type": "application/json"}),
    "no language": _post(json={"version": "*", "files": [{"content": "1"}]}),
    "an unknown language": _post(json={**PY, "language": "cobol-2099"}),
    "a body past the cap": _post(
        content=b" " * 2_000_000, headers={"Content-Type": "application/json"}
    ),
    "a browser key without Origin": _post(key="browser"),
    "a browser key from its origin": _post(key="browser", headers={"Origin": APP}),
    "a browser key from another origin": _post(
        key="browser", headers={"Origin": "https://evil.example"}
    ),
    "no-store": _post(headers={"Cache-Control": "no-store"}),
}


class TestDirectRoute:
    async def test_execute_does_not_go_through_fastapi_routing(self, gateway: Gateway) -> None:
        stack = await _stack(gateway)
        assert set(stack.direct) == {("POST", "/api/v2/execute"), ("POST", "/api/v2/execute/")}
        reached: list[str] = []
        full = stack.full

        async def counting(scope: Scope, receive: Receive, send: Send) -> None:
            reached.append(scope["path"])
            await full(scope, receive, send)

        stack.full = counting
        key = await gateway.tenant()
        auth = {"Authorization": f"Bearer {key}"}
        assert (await gateway.execute(key, PY)).status_code == 200
        assert (await gateway.client.post("/api/v2/execute/", json=PY, headers=auth)).is_success
        assert reached == []
        assert (await gateway.client.get("/api/v2/runtimes", headers=auth)).status_code == 200
        # Other methods on the same path are FastAPI's: its 405, and a preflight's CORS answer.
        assert (await gateway.client.get("/api/v2/execute", headers=auth)).status_code == 405
        assert reached == ["/api/v2/runtimes", "/api/v2/execute"]

    @pytest.mark.parametrize("case", list(CASES))
    async def test_same_answer_as_the_full_stack(self, gateway: Gateway, case: str) -> None:
        stack = await _stack(gateway)
        fields = {"rate_limit": "50/minute"}
        direct_keys = await _tenant_with_keys(gateway, "direct", **fields)
        full_keys = await _tenant_with_keys(gateway, "full", **fields)
        send = CASES[case]
        async with _full_stack_client(gateway, stack) as full_client:
            # Twice each: the second run of a cacheable request is the cache hit.
            for _ in range(2):
                direct = await send(gateway.client, direct_keys)
                through_fastapi = await send(full_client, full_keys)
                assert _seen(direct) == _seen(through_fastapi), case
                assert direct.headers["x-request-id"]

    async def test_rate_limited_alike(self, gateway: Gateway) -> None:
        stack = await _stack(gateway)
        direct_keys = await _tenant_with_keys(gateway, "direct", rate_limit="1/minute")
        full_keys = await _tenant_with_keys(gateway, "full", rate_limit="1/minute")
        async with _full_stack_client(gateway, stack) as full_client:
            for status in (200, 429):
                direct = await _post()(gateway.client, direct_keys)
                through_fastapi = await _post()(full_client, full_keys)
                assert direct.status_code == status
                assert _seen(direct) == _seen(through_fastapi)
                assert int(direct.headers["x-ratelimit-reset"]) == pytest.approx(
                    int(through_fastapi.headers["x-ratelimit-reset"]), abs=1
                )

    async def test_an_unexpected_error_is_the_same_500(
        self, gateway: Gateway, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        stack = await _stack(gateway)
        keys = await _tenant_with_keys(gateway, "direct")

        async def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("a bug")

        monkeypatch.setattr(gateway.state.pool, "execute", broken)
        async with _full_stack_client(gateway, stack) as full_client:
            body = {**PY, "stdin": "never cached"}
            direct = await _post(json=body, headers={"Cache-Control": "no-store"})(
                gateway.client, keys
            )
            through_fastapi = await _post(json=body, headers={"Cache-Control": "no-store"})(
                full_client, keys
            )
        assert direct.status_code == through_fastapi.status_code == 500
        assert direct.json() == through_fastapi.json() == {"message": "internal error"}
        assert direct.headers["x-request-id"]

    async def test_request_metrics_name_the_route(self, gateway: Gateway) -> None:
        key = await gateway.tenant()
        await gateway.execute(key, PY)
        await gateway.client.post("/api/v2/execute/", json=PY, headers={"Authorization": key})
        metrics = (await gateway.client.get("/metrics", headers=ADMIN)).text
        assert 'route="/api/v2/execute",status="200"' in metrics
        assert 'route="/api/v2/execute/",status="200"' in metrics
