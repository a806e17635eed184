"""Browser keys over two real gateway processes on one Redis: a key minted on one is answered
CORS and served by the other within 2 s, a revocation takes its origins away within 2 s, and the
WebSocket checks the handshake's Origin before anything reaches the upstream."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from tests.e2e.conftest import E2E_ADMIN_KEY
from tests.support import LOG_SCAN, Service, engine_jobs, ws_conversation

ADMIN = {"Authorization": f"Bearer {E2E_ADMIN_KEY}"}
APP = "http://app.example.test:8080"
PY = {"language": "python", "version": "*", "files": [{"content": "print(6 * 7)"}]}


def _mint(gateway: Service, tenant_id: str, origins: list[str]) -> dict[str, Any]:
    created = httpx.post(f"{gateway.url}/admin/tenants", json={"id": tenant_id}, headers=ADMIN)
    assert created.status_code == 201, created.text
    minted = httpx.post(
        f"{gateway.url}/admin/tenants/{tenant_id}/keys",
        json={"allowed_origins": origins},
        headers=ADMIN,
    )
    assert minted.status_code == 201, minted.text
    key: dict[str, Any] = minted.json()
    LOG_SCAN.secret(key["key"])
    return key


def _preflight(gateway: Service, origin: str) -> httpx.Response:
    return httpx.options(
        f"{gateway.url}/api/v2/execute",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )


def _allowed(gateway: Service, origin: str) -> bool:
    allowed: str | None = _preflight(gateway, origin).headers.get("access-control-allow-origin")
    return allowed == origin


def _seconds_until(condition: Any, limit: float) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > limit:
            raise AssertionError(f"not within {limit} s")
        time.sleep(0.02)
    return time.monotonic() - started


def _execute(gateway: Service, key: str, origin: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    if origin is not None:
        headers["Origin"] = origin
    return httpx.post(f"{gateway.url}/api/v2/execute", json=PY, headers=headers, timeout=30)


class TestAcrossReplicas:
    def test_mint_on_one_served_by_the_other_then_revoked(self, replicas: list[Service]) -> None:
        first, second = replicas
        assert not _allowed(second, APP)
        minted = _mint(first, "browser-e2e", [APP])
        assert _seconds_until(lambda: _allowed(second, APP), 2.0) < 2.0
        answer = _execute(second, minted["key"], APP)
        assert answer.status_code == 200, answer.text
        assert answer.json()["run"]["stdout"] == "42\n"
        assert answer.headers["access-control-allow-origin"] == APP
        assert "Origin" in answer.headers["vary"]
        assert "X-Cache" in answer.headers["access-control-expose-headers"]

        missing = _execute(second, minted["key"], None)
        assert missing.status_code == 403
        assert "only works from its allowed origins" in missing.json()["message"]

        revoked = httpx.delete(f"{first.url}/admin/keys/{minted['id']}", headers=ADMIN)
        assert revoked.status_code == 204
        assert _seconds_until(lambda: not _allowed(second, APP), 2.0) < 2.0
        assert not _allowed(first, APP)
        assert _execute(second, minted["key"], APP).status_code == 401

    def test_default_port_is_the_same_origin(self, replicas: list[Service]) -> None:
        first, second = replicas
        minted = _mint(first, "browser-port", ["https://secure.example.test:443"])
        # Browsers leave the default port out of Origin: that spelling must be the one allowed.
        origin = "https://secure.example.test"
        assert _seconds_until(lambda: _allowed(second, origin), 2.0) < 2.0
        assert _execute(second, minted["key"], origin).status_code == 200
        assert _execute(second, minted["key"], "https://secure.example.test:443").status_code == 200
        wrong = _execute(second, minted["key"], "https://secure.example.test:8443")
        assert wrong.status_code == 403
        assert wrong.json() == {
            "message": "origin 'https://secure.example.test:8443' is not allowed for this key"
        }


class TestWebSocket:
    async def test_wrong_origin_refused_right_origin_runs(
        self, replicas: list[Service], engine: Service
    ) -> None:
        first, second = replicas
        minted = await asyncio.to_thread(_mint, first, "browser-ws", [APP])
        url = second.url.replace("http://", "ws://") + f"/api/v2/connect?api_key={minted['key']}"
        await asyncio.to_thread(_seconds_until, lambda: _allowed(second, APP), 2.0)

        jobs = await asyncio.to_thread(engine_jobs, engine)
        received, code = await ws_conversation(
            url, [{"type": "init", **PY}], origin="https://evil.example.test"
        )
        assert code == 1008
        assert await asyncio.to_thread(engine_jobs, engine) == jobs  # nothing reached it
        assert received == [
            {
                "type": "error",
                "message": "origin 'https://evil.example.test' is not allowed for this key",
            }
        ]

        received, code = await ws_conversation(url, [{"type": "init", **PY}], origin=APP)
        assert code == 4999, received
        stdout = "".join(m["data"] for m in received if m.get("stream") == "stdout")
        assert stdout == "42\n"
