"""Authentication and scopes on every route group, as a client sees them."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_KEY, Gateway, GatewayFactory

PY = {"language": "python", "version": "*", "files": [{"content": "print('hi')"}]}

# (method, path, json body) of every route that needs a key, by the scope it needs.
EXECUTE_ROUTES: list[tuple[str, str, Any]] = [
    ("POST", "/api/v2/execute", PY),
    ("POST", "/api/v2/execute/", PY),
    ("GET", "/api/v2/runtimes", None),
    ("GET", "/api/v2/runtimes/", None),
    ("GET", "/api/v2/packages", None),
]
ADMIN_ROUTES: list[tuple[str, str, Any]] = [
    ("POST", "/api/v2/packages", {"language": "python", "version": "*"}),
    ("DELETE", "/api/v2/packages", {"language": "python", "version": "*"}),
    ("POST", "/admin/tenants", {"id": "newco"}),
    ("GET", "/admin/tenants", None),
    ("GET", "/admin/tenants/acme", None),
    ("PATCH", "/admin/tenants/acme", {"name": "x"}),
    ("DELETE", "/admin/tenants/acme", None),
    ("POST", "/admin/tenants/acme/keys", {}),
    ("GET", "/admin/tenants/acme/keys", None),
    ("DELETE", "/admin/keys/key_0000000000000000", None),
    ("GET", "/admin/tenants/acme/usage", None),
]
ALL_ROUTES = EXECUTE_ROUTES + ADMIN_ROUTES
_ids = [f"{method} {path}" for method, path, _ in ALL_ROUTES]


async def _call(
    gateway: Gateway, route: tuple[str, str, Any], headers: dict[str, str]
) -> httpx.Response:
    method, path, body = route
    return await gateway.client.request(method, path, json=body, headers=headers)


def _assert_401(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json() == {"message": "a valid API key is required"}


@pytest.fixture
async def keys(gateway: Gateway) -> dict[str, str]:
    """One key of each kind for tenant acme."""
    store = gateway.state.store
    execute = await gateway.tenant("acme")
    _, admin_only = await store.create_key("acme", scopes=["admin"])
    revoked_key, revoked = await store.create_key("acme")
    await store.revoke_key(revoked_key.id)
    past = datetime.now(UTC) - timedelta(minutes=1)
    _, expired = await store.create_key("acme", expires_at=past)
    return {"execute": execute, "admin_only": admin_only, "revoked": revoked, "expired": expired}


class TestRefusedKeys:
    @pytest.mark.parametrize("route", ALL_ROUTES, ids=_ids)
    async def test_without_key(self, gateway: Gateway, route: tuple[str, str, Any]) -> None:
        _assert_401(await _call(gateway, route, {}))

    @pytest.mark.parametrize("route", ALL_ROUTES, ids=_ids)
    async def test_unknown_key(self, gateway: Gateway, route: tuple[str, str, Any]) -> None:
        _assert_401(await _call(gateway, route, {"Authorization": "Bearer pgw_" + "x" * 43}))

    @pytest.mark.parametrize("route", ALL_ROUTES, ids=_ids)
    async def test_revoked_key(
        self, gateway: Gateway, keys: dict[str, str], route: tuple[str, str, Any]
    ) -> None:
        _assert_401(await _call(gateway, route, {"X-API-Key": keys["revoked"]}))

    @pytest.mark.parametrize("route", ALL_ROUTES, ids=_ids)
    async def test_expired_key(
        self, gateway: Gateway, keys: dict[str, str], route: tuple[str, str, Any]
    ) -> None:
        _assert_401(await _call(gateway, route, {"Authorization": keys["expired"]}))

    @pytest.mark.parametrize(
        "headers",
        [
            {"Authorization": "Basic dXNlcjpwYXNz"},
            {"Authorization": "Bearer"},
            {"Authorization": ""},
            {"X-API-Key": ""},
            {"X-API-Key": "pgw_"},
        ],
    )
    async def test_malformed_headers(self, gateway: Gateway, headers: dict[str, str]) -> None:
        _assert_401(await gateway.client.get("/api/v2/runtimes", headers=headers))

    async def test_refusals_are_indistinguishable(
        self, gateway: Gateway, keys: dict[str, str]
    ) -> None:
        answers = set()
        for headers in (
            {},
            {"X-API-Key": "pgw_unknown"},
            {"X-API-Key": keys["revoked"]},
            {"X-API-Key": keys["expired"]},
        ):
            response = await gateway.client.get("/admin/tenants", headers=headers)
            answers.add((response.status_code, response.text, response.headers["www-authenticate"]))
        assert len(answers) == 1

    async def test_key_never_echoed_in_errors(self, gateway: Gateway, keys: dict[str, str]) -> None:
        for key in keys.values():
            for route in ALL_ROUTES:
                response = await _call(gateway, route, {"X-API-Key": key})
                assert key not in response.text
                assert key[12:] not in response.text


class TestScopes:
    @pytest.mark.parametrize("route", ADMIN_ROUTES, ids=[f"{m} {p}" for m, p, _ in ADMIN_ROUTES])
    async def test_execute_key_on_admin_routes(
        self, gateway: Gateway, keys: dict[str, str], route: tuple[str, str, Any]
    ) -> None:
        response = await _call(gateway, route, {"Authorization": f"Bearer {keys['execute']}"})
        assert response.status_code == 403, response.text
        assert response.json() == {"message": "this key lacks the 'admin' scope"}

    async def test_admin_only_key_cannot_execute(
        self, gateway: Gateway, keys: dict[str, str]
    ) -> None:
        response = await gateway.execute(keys["admin_only"], PY)
        assert response.status_code == 403, response.text
        assert response.json() == {"message": "this key lacks the 'execute' scope"}

    async def test_admin_only_key_on_admin_routes(
        self, gateway: Gateway, keys: dict[str, str]
    ) -> None:
        response = await gateway.client.get(
            "/admin/tenants", headers={"X-API-Key": keys["admin_only"]}
        )
        assert response.status_code == 200

    async def test_gateway_admin_key(self, gateway: Gateway, keys: dict[str, str]) -> None:
        for headers in (
            {"Authorization": f"Bearer {ADMIN_KEY}"},
            {"Authorization": ADMIN_KEY},
            {"X-API-Key": ADMIN_KEY},
        ):
            response = await gateway.client.get("/admin/tenants", headers=headers)
            assert response.status_code == 200, response.text
            assert [t["id"] for t in response.json()] == ["acme"]

    async def test_no_admin_key_configured(self, make_gateway: GatewayFactory) -> None:
        gateway = await make_gateway(admin_key=None)
        response = await gateway.client.get("/admin/tenants", headers={"X-API-Key": ADMIN_KEY})
        _assert_401(response)


class TestHeaderForms:
    @pytest.mark.parametrize(
        "form",
        [
            lambda key: {"Authorization": f"Bearer {key}"},
            lambda key: {"Authorization": f"bearer {key}"},
            lambda key: {"X-API-Key": key},
            lambda key: {"Authorization": key},
        ],
        ids=["bearer", "bearer-lowercase", "x-api-key", "bare"],
    )
    async def test_each_form_is_accepted(
        self, gateway: Gateway, keys: dict[str, str], form: Any
    ) -> None:
        response = await gateway.client.get("/api/v2/runtimes", headers=form(keys["execute"]))
        assert response.status_code == 200, response.text
        response = await gateway.client.post(
            "/api/v2/execute", json=PY, headers=form(keys["execute"])
        )
        assert response.status_code == 200, response.text
        assert response.json()["run"]["stdout"] == "hi\n"


class TestLiveChanges:
    async def test_revoked_through_admin_api_is_refused_at_once(
        self, gateway: Gateway, keys: dict[str, str]
    ) -> None:
        key = keys["execute"]
        assert (
            await gateway.client.get("/api/v2/runtimes", headers={"X-API-Key": key})
        ).status_code == 200
        listed = await gateway.client.get(
            "/admin/tenants/acme/keys", headers={"X-API-Key": ADMIN_KEY}
        )
        key_id = next(k["id"] for k in listed.json() if k["prefix"] == key[:12])
        revoked = await gateway.client.delete(
            f"/admin/keys/{key_id}", headers={"X-API-Key": ADMIN_KEY}
        )
        assert revoked.status_code == 204
        # Polled: the answer is what is observed; there is no event to wait on from outside.
        async with asyncio.timeout(2):
            while True:
                check = await gateway.client.get("/api/v2/runtimes", headers={"X-API-Key": key})
                if check.status_code == 401:
                    break
                await asyncio.sleep(0.02)

    async def test_minted_key_works_at_once(self, gateway: Gateway) -> None:
        await gateway.tenant("acme")
        minted = await gateway.client.post(
            "/admin/tenants/acme/keys", json={}, headers={"X-API-Key": ADMIN_KEY}
        )
        key = minted.json()["key"]
        response = await gateway.client.get("/api/v2/runtimes", headers={"X-API-Key": key})
        assert response.status_code == 200


class TestAuthFailureLimit:
    async def test_guessing_gets_429(self, make_gateway: GatewayFactory) -> None:
        gateway = await make_gateway(auth_failure_rate_limit="3/minute")
        await gateway.tenant("acme")
        statuses = [
            (
                await gateway.client.get("/api/v2/runtimes", headers={"X-API-Key": f"pgw_guess{i}"})
            ).status_code
            for i in range(5)
        ]
        assert statuses[:3] == [401, 401, 401]
        assert statuses[-1] == 429
        blocked = await gateway.client.get("/api/v2/runtimes", headers={"X-API-Key": "pgw_x"})
        assert blocked.status_code == 429
        assert int(blocked.headers["retry-after"]) >= 1
        assert "message" in blocked.json()

    async def test_valid_key_is_never_refused_for_others_failures(
        self, make_gateway: GatewayFactory
    ) -> None:
        """One office behind a NAT: one user's typos must not lock the others out."""
        gateway = await make_gateway(auth_failure_rate_limit="3/minute")
        key = await gateway.tenant("acme")
        for i in range(5):
            await gateway.client.get("/api/v2/runtimes", headers={"X-API-Key": f"pgw_guess{i}"})
        for _ in range(3):
            served = await gateway.client.get("/api/v2/runtimes", headers={"X-API-Key": key})
            assert served.status_code == 200, served.text
        still = await gateway.client.get("/api/v2/runtimes", headers={"X-API-Key": "pgw_guess9"})
        assert still.status_code == 429  # the failures are still limited

    async def test_keyless_request_is_not_an_attempt(self, make_gateway: GatewayFactory) -> None:
        gateway = await make_gateway(auth_failure_rate_limit="3/minute")
        for _ in range(6):
            keyless = await gateway.client.get("/api/v2/runtimes")
            assert keyless.status_code == 401
            assert keyless.headers["www-authenticate"] == "Bearer"
        # None of them counted: three real failures are still 401, the fourth 429.
        statuses = [
            (
                await gateway.client.get("/api/v2/runtimes", headers={"X-API-Key": f"pgw_g{i}"})
            ).status_code
            for i in range(4)
        ]
        assert statuses == [401, 401, 401, 429]
