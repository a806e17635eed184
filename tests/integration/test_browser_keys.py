"""Browser keys through the app (CONTRACT.md "Browser keys"): minting and validation, the Origin
check on every route, CORS for live keys' origins, and the per-client limit with its headers."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_KEY, Gateway, GatewayFactory
from tests.support import MovableClock

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
APP = "https://app.example.com"
PY = {"language": "python", "version": "*", "files": [{"content": "print(1)"}]}


async def _tenant(gateway: Gateway, tenant_id: str = "acme", **fields: Any) -> None:
    response = await gateway.client.post(
        "/admin/tenants", json={"id": tenant_id, **fields}, headers=ADMIN
    )
    assert response.status_code == 201, response.text


async def _mint(gateway: Gateway, body: dict[str, Any], tenant_id: str = "acme") -> httpx.Response:
    return await gateway.client.post(f"/admin/tenants/{tenant_id}/keys", json=body, headers=ADMIN)


async def _browser_key(gateway: Gateway, **body: Any) -> dict[str, Any]:
    await _tenant(gateway)
    response = await _mint(gateway, {"allowed_origins": [APP], **body})
    assert response.status_code == 201, response.text
    minted: dict[str, Any] = response.json()
    return minted


def _preflight_headers(origin: str) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }


class TestMinting:
    async def test_key_object_carries_both_fields_normalized(self, gateway: Gateway) -> None:
        await _tenant(gateway)
        response = await _mint(
            gateway,
            {
                "allowed_origins": ["HTTPS://App.Example.com:443", "http://localhost:5173", APP],
                "client_rate_limit": "10/minute",
            },
        )
        assert response.status_code == 201, response.text
        minted = response.json()
        assert minted["allowed_origins"] == [APP, "http://localhost:5173"]
        assert minted["client_rate_limit"] == "10/minute"
        listed = await gateway.client.get("/admin/tenants/acme/keys", headers=ADMIN)
        assert listed.json()[0]["allowed_origins"] == [APP, "http://localhost:5173"]
        assert listed.json()[0]["client_rate_limit"] == "10/minute"

    @pytest.mark.parametrize(
        ("body", "message"),
        [
            ({"allowed_origins": ["https://app.example.com/"]}, "is not an origin"),
            ({"allowed_origins": ["https://app.example.com/path"]}, "is not an origin"),
            ({"allowed_origins": ["app.example.com"]}, "is not an origin"),
            ({"allowed_origins": ["ftp://app.example.com"]}, "must be http or https"),
            ({"allowed_origins": ["https://app.example.com:99999"]}, "port must be between"),
            ({"allowed_origins": ["*"]}, "is not an origin"),
            ({"allowed_origins": []}, "name at least one origin"),
            ({"allowed_origins": "https://app.example.com"}, "valid list"),
            ({"allowed_origins": [5]}, "valid string"),
            ({"client_rate_limit": "often"}, "is not a rate limit"),
            ({"client_rate_limit": "0/minute"}, "allows no request"),
            ({"client_rate_limit": 10}, "valid string"),
        ],
    )
    async def test_bad_fields_are_400_saying_what_is_wrong(
        self, gateway: Gateway, body: dict[str, Any], message: str
    ) -> None:
        await _tenant(gateway)
        response = await _mint(gateway, body)
        assert response.status_code == 400, response.text
        (field,) = body
        assert response.json()["message"].startswith(field)
        assert message in response.json()["message"]
        listed = await gateway.client.get("/admin/tenants/acme/keys", headers=ADMIN)
        assert listed.json() == []

    async def test_a_browser_key_cannot_administer(self, gateway: Gateway) -> None:
        """A browser key is public in its pages and any script can send its Origin."""
        await _tenant(gateway)
        response = await _mint(gateway, {"allowed_origins": [APP], "scopes": ["execute", "admin"]})
        assert response.status_code == 400, response.text
        assert response.json()["message"].startswith("allowed_origins")
        assert "cannot have the admin scope" in response.json()["message"]
        listed = await gateway.client.get("/admin/tenants/acme/keys", headers=ADMIN)
        assert listed.json() == []

    async def test_expires_at_is_iso_text_only(self, gateway: Gateway) -> None:
        await _tenant(gateway)
        response = await _mint(gateway, {"expires_at": 1893456000})
        assert response.status_code == 400, response.text
        assert response.json()["message"].startswith("expires_at")


class TestOriginCheck:
    async def test_allowed_origin_works_and_gets_cors_headers(self, gateway: Gateway) -> None:
        key = (await _browser_key(gateway))["key"]
        response = await gateway.execute(key, PY, Origin=APP)
        assert response.status_code == 200, response.text
        assert response.json()["run"]["stdout"] == "1\n"
        assert response.headers["access-control-allow-origin"] == APP
        assert "Origin" in response.headers["vary"]
        exposed = response.headers["access-control-expose-headers"]
        for name in ("X-Cache", "X-Request-ID", "X-RateLimit-Remaining", "RateLimit"):
            assert name in exposed

    async def test_default_port_and_case_are_the_same_origin(self, gateway: Gateway) -> None:
        key = (await _browser_key(gateway))["key"]
        for origin in ("https://app.example.com:443", "HTTPS://APP.example.com"):
            response = await gateway.execute(key, PY, Origin=origin)
            assert response.status_code == 200, (origin, response.text)

    async def test_other_origin_is_403(self, gateway: Gateway) -> None:
        key = (await _browser_key(gateway))["key"]
        for origin in ("https://evil.example.com", "http://app.example.com", f"{APP}:8443"):
            response = await gateway.execute(key, PY, Origin=origin)
            assert response.status_code == 403
            assert response.json() == {"message": f"origin '{origin}' is not allowed for this key"}
            assert "access-control-allow-origin" not in response.headers

    async def test_missing_origin_is_403(self, gateway: Gateway) -> None:
        key = (await _browser_key(gateway))["key"]
        response = await gateway.execute(key, PY)
        assert response.status_code == 403
        assert "only works from its allowed origins" in response.json()["message"]

    @pytest.mark.parametrize(
        ("method", "path"),
        [("GET", "/api/v2/runtimes"), ("GET", "/api/v2/packages"), ("POST", "/api/v2/batch")],
    )
    async def test_every_route_checks_the_origin(
        self, gateway: Gateway, method: str, path: str
    ) -> None:
        key = (await _browser_key(gateway))["key"]
        auth = {"Authorization": f"Bearer {key}"}
        body = (
            {**PY, "cases": [{"stdin": "", "expected_output": "1"}]} if method == "POST" else None
        )
        wrong = await gateway.client.request(
            method, path, json=body, headers={**auth, "Origin": "https://evil.example.com"}
        )
        assert wrong.status_code == 403, wrong.text
        missing = await gateway.client.request(method, path, json=body, headers=auth)
        assert missing.status_code == 403, missing.text
        right = await gateway.client.request(
            method, path, json=body, headers={**auth, "Origin": APP}
        )
        assert right.status_code == 200, right.text

    async def test_ordinary_key_needs_no_origin(self, gateway: Gateway) -> None:
        await _tenant(gateway)
        key = (await _mint(gateway, {})).json()["key"]
        assert (await gateway.execute(key, PY)).status_code == 200
        other = await gateway.execute(key, PY, Origin="https://anywhere.example.com")
        assert other.status_code == 200
        assert "access-control-allow-origin" not in other.headers


class TestPreflight:
    async def test_answered_for_a_live_key_only(self, gateway: Gateway) -> None:
        before = await gateway.client.options("/api/v2/execute", headers=_preflight_headers(APP))
        assert "access-control-allow-origin" not in before.headers
        minted = await _browser_key(gateway)
        during = await gateway.client.options("/api/v2/execute", headers=_preflight_headers(APP))
        assert during.status_code == 200, during.text
        assert during.headers["access-control-allow-origin"] == APP
        assert "authorization" in during.headers["access-control-allow-headers"].lower()
        other = await gateway.client.options(
            "/api/v2/execute", headers=_preflight_headers("https://evil.example.com")
        )
        assert "access-control-allow-origin" not in other.headers
        revoked = await gateway.client.delete(f"/admin/keys/{minted['id']}", headers=ADMIN)
        assert revoked.status_code == 204
        deadline = time.monotonic() + 2
        while True:
            after = await gateway.client.options("/api/v2/execute", headers=_preflight_headers(APP))
            if "access-control-allow-origin" not in after.headers:
                break
            assert time.monotonic() < deadline, "preflight still allowed 2 s after revocation"
            await asyncio.sleep(0.02)

    async def test_tenant_delete_drops_its_origins(self, gateway: Gateway) -> None:
        await _browser_key(gateway)
        deleted = await gateway.client.delete("/admin/tenants/acme", headers=ADMIN)
        assert deleted.status_code == 204
        deadline = time.monotonic() + 2
        while (
            "access-control-allow-origin"
            in (
                await gateway.client.options("/api/v2/execute", headers=_preflight_headers(APP))
            ).headers
        ):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)

    async def test_expired_key_is_dropped_without_a_message(
        self, make_gateway: GatewayFactory
    ) -> None:
        clock = MovableClock()
        gateway = await make_gateway(clock=clock)
        expires = datetime.fromtimestamp(clock.wall() + 60, UTC).isoformat()
        minted = await _browser_key(gateway, expires_at=expires)
        allowed = await gateway.client.options("/api/v2/execute", headers=_preflight_headers(APP))
        assert allowed.headers.get("access-control-allow-origin") == APP
        assert (await gateway.execute(minted["key"], PY, Origin=APP)).status_code == 200
        clock.advance(59)
        allowed = await gateway.client.options("/api/v2/execute", headers=_preflight_headers(APP))
        assert allowed.headers.get("access-control-allow-origin") == APP
        clock.advance(2)  # past its expiry: no message needed, the moment is enough
        refused = await gateway.client.options("/api/v2/execute", headers=_preflight_headers(APP))
        assert "access-control-allow-origin" not in refused.headers
        assert (await gateway.execute(minted["key"], PY, Origin=APP)).status_code == 401

    async def test_loaded_at_start(self, make_gateway: GatewayFactory) -> None:
        first = await make_gateway()
        await _browser_key(first)
        later = await make_gateway()  # started after the mint: knows it from the index
        answer = await later.client.options("/api/v2/execute", headers=_preflight_headers(APP))
        assert answer.headers.get("access-control-allow-origin") == APP

    async def test_without_redis(self, make_gateway: GatewayFactory) -> None:
        gateway = await make_gateway(redis_url=None)  # the in-process store keeps the set
        minted = await _browser_key(gateway)
        allowed = await gateway.client.options("/api/v2/execute", headers=_preflight_headers(APP))
        assert allowed.headers.get("access-control-allow-origin") == APP
        assert (await gateway.execute(minted["key"], PY, Origin=APP)).status_code == 200
        await gateway.client.delete(f"/admin/keys/{minted['id']}", headers=ADMIN)
        after = await gateway.client.options("/api/v2/execute", headers=_preflight_headers(APP))
        assert "access-control-allow-origin" not in after.headers

    async def test_configured_cors_origins_still_work(self, make_gateway: GatewayFactory) -> None:
        gateway = await make_gateway(cors_origins=["https://ops.example.com"])
        answer = await gateway.client.options(
            "/api/v2/execute", headers=_preflight_headers("https://ops.example.com")
        )
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == "https://ops.example.com"


PROXY = {"trusted_proxies": ["127.0.0.0/8"]}


async def _client_limited(gateway: Gateway, client_limit: str = "2/minute") -> str:
    await _tenant(gateway, rate_limit="5/minute")
    response = await _mint(gateway, {"allowed_origins": [APP], "client_rate_limit": client_limit})
    assert response.status_code == 201, response.text
    key: str = response.json()["key"]
    return key


async def _from(gateway: Gateway, key: str, address: str) -> httpx.Response:
    return await gateway.execute(key, PY, Origin=APP, **{"X-Forwarded-For": address})


class TestClientRateLimit:
    @pytest.mark.parametrize("redis", [True, False], ids=["redis", "in-process"])
    async def test_each_address_gets_its_share(
        self, make_gateway: GatewayFactory, redis: bool
    ) -> None:
        gateway = await make_gateway(**PROXY, **({} if redis else {"redis_url": None}))
        key = await _client_limited(gateway)
        first = await _from(gateway, key, "203.0.113.1")
        assert first.status_code == 200, first.text
        # The client's window (1 left of 2) is closer to running out than the tenant's (4 of 5).
        assert first.headers["x-ratelimit-limit"] == "2"
        assert first.headers["x-ratelimit-remaining"] == "1"
        assert first.headers["ratelimit-policy"] == '"default";q=5;w=60, "client";q=2;w=60'
        assert first.headers["ratelimit"].startswith('"client";r=1;t=')
        assert (await _from(gateway, key, "203.0.113.1")).status_code == 200
        refused = await _from(gateway, key, "203.0.113.1")
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.headers["x-ratelimit-remaining"] == "0"
        assert "each client address" in refused.json()["message"]
        # The page can read its 429 (and when to retry): the answer carries the CORS headers.
        assert refused.headers["access-control-allow-origin"] == APP
        assert "Retry-After" in refused.headers["access-control-expose-headers"]
        # Another address has a share of its own; the tenant's 5 still hold for all.
        other = await _from(gateway, key, "203.0.113.2")
        assert other.status_code == 200, other.text
        assert other.headers["x-ratelimit-remaining"] == "1"
        assert (await _from(gateway, key, "203.0.113.2")).status_code == 200
        third = await _from(gateway, key, "203.0.113.3")
        assert third.status_code == 200
        # Tenant: 5 used now. The tenant's window names the refusal.
        assert third.headers["ratelimit"].startswith('"default";r=0;')
        over = await _from(gateway, key, "203.0.113.4")
        assert over.status_code == 429
        assert "each client address" not in over.json()["message"]

    async def test_forwarded_for_ignored_from_an_untrusted_peer(self, gateway: Gateway) -> None:
        key = await _client_limited(gateway)
        assert (await _from(gateway, key, "203.0.113.1")).status_code == 200
        assert (await _from(gateway, key, "203.0.113.2")).status_code == 200
        # Both came from the same peer (no trusted proxy): one client, its 2 used up.
        assert (await _from(gateway, key, "203.0.113.3")).status_code == 429

    async def test_a_forged_first_forwarded_for_line_changes_nothing(
        self, make_gateway: GatewayFactory
    ) -> None:
        """A proxy that adds a header line of its own (HAProxy's `option forwardfor`) leaves the
        client's forged line first: the lines are one list, read from the right."""
        gateway = await make_gateway(**PROXY)
        key = await _client_limited(gateway)
        statuses = []
        for n in range(3):
            response = await gateway.client.post(
                "/api/v2/execute",
                json=PY,
                headers=[
                    ("Authorization", f"Bearer {key}"),
                    ("Origin", APP),
                    ("X-Forwarded-For", f"198.51.100.{n}"),  # the client's own, forged
                    ("X-Forwarded-For", "203.0.113.9"),  # the proxy's
                ],
            )
            statuses.append(response.status_code)
        assert statuses == [200, 200, 429]

    async def test_refused_client_consumes_no_tenant_allowance(self, make_gateway: Any) -> None:
        gateway = await make_gateway(**PROXY)
        key = await _client_limited(gateway, "1/minute")
        assert (await _from(gateway, key, "203.0.113.1")).status_code == 200
        for _ in range(3):
            assert (await _from(gateway, key, "203.0.113.1")).status_code == 429
        for n in range(2, 6):
            assert (await _from(gateway, key, f"203.0.113.{n}")).status_code == 200
