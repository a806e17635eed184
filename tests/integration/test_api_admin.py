"""The admin API, as an operator's script sees it: the contract's table, row by row."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_KEY, Gateway, GatewayFactory

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
ACME: dict[str, Any] = {
    "id": "acme",
    "name": "Acme Inc",
    "allowed_languages": ["python", "scala"],
    "rate_limit": "60/minute",
    "max_concurrency": 4,
    "daily_quota": 10000,
    "max_run_timeout": 3000,
    "max_compile_timeout": 10000,
    "max_run_memory_limit": -1,
    "max_compile_memory_limit": -1,
    "cache": True,
}
KEY_FIELDS = {
    "id",
    "tenant",
    "name",
    "prefix",
    "scopes",
    "created_at",
    "expires_at",
    "revoked",
    "allowed_origins",
    "client_rate_limit",
}


async def _admin(gateway: Gateway, method: str, path: str, body: Any = None) -> httpx.Response:
    return await gateway.client.request(method, f"/admin{path}", json=body, headers=ADMIN)


async def _create(gateway: Gateway, body: dict[str, Any] | None = None) -> dict[str, Any]:
    response = await _admin(gateway, "POST", "/tenants", body or ACME)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


class TestCreateTenant:
    async def test_created(self, gateway: Gateway) -> None:
        tenant = await _create(gateway)
        assert {k: tenant[k] for k in ACME} == ACME
        assert ISO_Z.match(tenant["created_at"])

    async def test_omitted_fields_take_defaults(self, gateway: Gateway) -> None:
        tenant = await _create(gateway, {"id": "plain"})
        assert tenant["allowed_languages"] == ["*"]
        assert tenant["cache"] is True
        assert tenant["rate_limit"] is None
        assert tenant["daily_quota"] is None

    async def test_duplicate_is_409(self, gateway: Gateway) -> None:
        await _create(gateway)
        response = await _admin(gateway, "POST", "/tenants", {"id": "acme", "name": "other"})
        assert response.status_code == 409
        assert response.json() == {"message": "tenant 'acme' already exists"}

    @pytest.mark.parametrize(
        ("body", "message"),
        [
            ({"id": "Acme"}, "'Acme' is not a tenant id"),
            ({"id": "-acme"}, "is not a tenant id"),
            ({"id": "a" * 65}, "is not a tenant id"),
            ({"id": "ac me"}, "is not a tenant id"),
            ({"id": "_admin"}, "is not a tenant id"),
            ({}, "id: Field required"),
            ({"id": "acme", "rate_limit": "lots"}, "rate_limit: 'lots' is not a rate limit"),
            ({"id": "acme", "rate_limit": "5/fortnight"}, "rate_limit:"),
            ({"id": "acme", "max_concurrency": 0}, "max_concurrency:"),
            ({"id": "acme", "daily_quota": -5}, "daily_quota:"),
            ({"id": "acme", "max_run_timeout": -2}, "max_run_timeout:"),
            ({"id": "acme", "allowed_languages": []}, "allowed_languages:"),
            ({"id": "acme", "cache": "sometimes"}, "cache:"),
            ({"id": "acme", "colour": "blue"}, "colour:"),
        ],
    )
    async def test_validation_is_400(
        self, gateway: Gateway, body: dict[str, Any], message: str
    ) -> None:
        response = await _admin(gateway, "POST", "/tenants", body)
        assert response.status_code == 400, response.text
        assert list(response.json()) == ["message"]
        assert message in response.json()["message"]

    async def test_not_json_is_400(self, gateway: Gateway) -> None:
        response = await gateway.client.post(
            "/admin/tenants",
            content=b"{nope",
            headers={**ADMIN, "Content-Type": "application/json"},
        )
        assert response.status_code in (400, 415)
        assert list(response.json()) == ["message"]


class TestReadTenants:
    async def test_list(self, gateway: Gateway) -> None:
        await _create(gateway, {"id": "zeta"})
        await _create(gateway)
        response = await _admin(gateway, "GET", "/tenants")
        assert response.status_code == 200
        assert [t["id"] for t in response.json()] == ["acme", "zeta"]

    async def test_list_empty(self, gateway: Gateway) -> None:
        response = await _admin(gateway, "GET", "/tenants")
        assert response.status_code == 200
        assert response.json() == []

    async def test_get(self, gateway: Gateway) -> None:
        created = await _create(gateway)
        response = await _admin(gateway, "GET", "/tenants/acme")
        assert response.status_code == 200
        assert response.json() == created

    async def test_get_unknown_is_404(self, gateway: Gateway) -> None:
        response = await _admin(gateway, "GET", "/tenants/nobody")
        assert response.status_code == 404
        assert response.json() == {"message": "tenant 'nobody' does not exist"}


class TestPatchTenant:
    async def test_changes_only_what_is_sent(self, gateway: Gateway) -> None:
        await _create(gateway)
        response = await _admin(
            gateway, "PATCH", "/tenants/acme", {"rate_limit": "10/second;500/hour", "cache": False}
        )
        assert response.status_code == 200, response.text
        tenant = response.json()
        assert tenant["rate_limit"] == "10/second;500/hour"
        assert tenant["cache"] is False
        assert tenant["name"] == "Acme Inc"
        assert tenant["max_concurrency"] == 4
        assert (await _admin(gateway, "GET", "/tenants/acme")).json() == tenant

    async def test_null_resets_to_default(self, gateway: Gateway) -> None:
        await _create(gateway)
        response = await _admin(
            gateway, "PATCH", "/tenants/acme", {"daily_quota": None, "allowed_languages": None}
        )
        assert response.json()["daily_quota"] is None
        assert response.json()["allowed_languages"] == ["*"]

    async def test_id_cannot_change(self, gateway: Gateway) -> None:
        await _create(gateway)
        response = await _admin(gateway, "PATCH", "/tenants/acme", {"id": "other"})
        assert response.status_code == 400
        assert response.json()["message"].startswith("id:")

    @pytest.mark.parametrize(
        "body", [{"rate_limit": "x"}, {"max_concurrency": -1}, {"colour": "blue"}]
    )
    async def test_validation_is_400(self, gateway: Gateway, body: dict[str, Any]) -> None:
        await _create(gateway)
        response = await _admin(gateway, "PATCH", "/tenants/acme", body)
        assert response.status_code == 400, response.text
        assert list(response.json()) == ["message"]

    async def test_unknown_is_404(self, gateway: Gateway) -> None:
        response = await _admin(gateway, "PATCH", "/tenants/nobody", {"name": "x"})
        assert response.status_code == 404

    async def test_tenant_change_reaches_its_keys(self, gateway: Gateway) -> None:
        key = await gateway.tenant("acme")
        await _admin(gateway, "PATCH", "/tenants/acme", {"allowed_languages": ["scala"]})
        response = await gateway.execute(
            key, {"language": "python", "version": "*", "files": [{"content": "print(1)"}]}
        )
        assert response.status_code == 403, response.text


class TestKeys:
    async def test_mint_with_defaults(self, gateway: Gateway) -> None:
        await _create(gateway)
        response = await _admin(gateway, "POST", "/tenants/acme/keys", {})
        assert response.status_code == 201, response.text
        minted = response.json()
        assert set(minted) == KEY_FIELDS | {"key"}
        assert minted["key"].startswith("pgw_")
        assert len(minted["key"]) >= 4 + 43
        assert minted["prefix"] == minted["key"][:12]
        assert minted["scopes"] == ["execute"]
        assert minted["tenant"] == "acme"
        assert minted["allowed_origins"] is None
        assert minted["client_rate_limit"] is None
        assert minted["expires_at"] is None
        assert minted["revoked"] is False
        assert ISO_Z.match(minted["created_at"])

    async def test_mint_without_body(self, gateway: Gateway) -> None:
        await _create(gateway)
        response = await gateway.client.post("/admin/tenants/acme/keys", headers=ADMIN)
        assert response.status_code == 201, response.text
        assert response.json()["scopes"] == ["execute"]

    async def test_mint_with_fields(self, gateway: Gateway) -> None:
        await _create(gateway)
        response = await _admin(
            gateway,
            "POST",
            "/tenants/acme/keys",
            {"name": "ci", "scopes": ["execute", "admin"], "expires_at": "2099-12-31T00:00:00Z"},
        )
        assert response.status_code == 201, response.text
        minted = response.json()
        assert minted["name"] == "ci"
        assert minted["scopes"] == ["execute", "admin"]
        assert minted["expires_at"] == "2099-12-31T00:00:00Z"

    async def test_expiry_with_offset_is_shown_in_utc(self, gateway: Gateway) -> None:
        await _create(gateway)
        response = await _admin(
            gateway, "POST", "/tenants/acme/keys", {"expires_at": "2099-12-31T02:00:00+02:00"}
        )
        assert response.json()["expires_at"] == "2099-12-31T00:00:00Z"

    @pytest.mark.parametrize(
        ("body", "message"),
        [
            ({"scopes": ["root"]}, "scopes"),
            ({"scopes": []}, "scopes"),
            ({"expires_at": "2001-01-01T00:00:00Z"}, "expires_at: must be in the future"),
            ({"expires_at": "soon"}, "expires_at"),
            ({"key": "pgw_chosen"}, "key"),
        ],
    )
    async def test_mint_validation_is_400(
        self, gateway: Gateway, body: dict[str, Any], message: str
    ) -> None:
        await _create(gateway)
        response = await _admin(gateway, "POST", "/tenants/acme/keys", body)
        assert response.status_code == 400, response.text
        assert message in response.json()["message"]

    async def test_mint_for_unknown_tenant_is_404(self, gateway: Gateway) -> None:
        response = await _admin(gateway, "POST", "/tenants/nobody/keys", {})
        assert response.status_code == 404
        assert response.json() == {"message": "tenant 'nobody' does not exist"}

    async def test_list_never_shows_the_secret(self, gateway: Gateway) -> None:
        await _create(gateway)
        minted = [
            (await _admin(gateway, "POST", "/tenants/acme/keys", {})).json() for _ in range(2)
        ]
        response = await _admin(gateway, "GET", "/tenants/acme/keys")
        assert response.status_code == 200
        listed = response.json()
        assert {k["id"] for k in listed} == {m["id"] for m in minted}
        for key in listed:
            assert set(key) == KEY_FIELDS
        for secret in (m["key"] for m in minted):
            assert secret not in response.text
            assert secret[12:] not in response.text

    async def test_list_for_unknown_tenant_is_404(self, gateway: Gateway) -> None:
        response = await _admin(gateway, "GET", "/tenants/nobody/keys")
        assert response.status_code == 404

    async def test_revoke(self, gateway: Gateway) -> None:
        await _create(gateway)
        minted = (await _admin(gateway, "POST", "/tenants/acme/keys", {})).json()
        key = {"X-API-Key": minted["key"]}
        assert (await gateway.client.get("/api/v2/runtimes", headers=key)).status_code == 200
        response = await _admin(gateway, "DELETE", f"/keys/{minted['id']}")
        assert response.status_code == 204
        assert response.content == b""
        assert (await gateway.client.get("/api/v2/runtimes", headers=key)).status_code == 401
        listed = (await _admin(gateway, "GET", "/tenants/acme/keys")).json()
        assert [k["revoked"] for k in listed] == [True]

    async def test_revoke_unknown_is_404(self, gateway: Gateway) -> None:
        response = await _admin(gateway, "DELETE", "/keys/key_0000000000000000")
        assert response.status_code == 404
        assert response.json() == {"message": "key 'key_0000000000000000' does not exist"}


class TestDeleteTenant:
    async def test_delete_revokes_keys(self, gateway: Gateway) -> None:
        key = await gateway.tenant("acme")
        headers = {"X-API-Key": key}
        assert (await gateway.client.get("/api/v2/runtimes", headers=headers)).status_code == 200
        response = await _admin(gateway, "DELETE", "/tenants/acme")
        assert response.status_code == 204
        assert (await gateway.client.get("/api/v2/runtimes", headers=headers)).status_code == 401
        assert (await _admin(gateway, "GET", "/tenants/acme")).status_code == 404
        assert (await _admin(gateway, "GET", "/tenants/acme/keys")).status_code == 404
        # Recreated under the same id, the tenant does not get the old keys back.
        await _create(gateway)
        assert (await gateway.client.get("/api/v2/runtimes", headers=headers)).status_code == 401
        assert (await _admin(gateway, "GET", "/tenants/acme/keys")).json() == []

    async def test_delete_unknown_is_404(self, gateway: Gateway) -> None:
        response = await _admin(gateway, "DELETE", "/tenants/nobody")
        assert response.status_code == 404

    @pytest.mark.parametrize("redis", [True, False], ids=["redis", "in-process"])
    async def test_recreated_tenant_starts_from_zero(
        self, make_gateway: GatewayFactory, redis: bool
    ) -> None:
        """Its usage, rate-limit window, daily quota and concurrency all go with the tenant."""
        gateway = await make_gateway(**({} if redis else {"redis_url": None}))
        body = {"language": "python", "version": "*", "files": [{"content": "print(3)"}]}
        policy = {"rate_limit": "2/hour", "daily_quota": 2, "max_concurrency": 1}
        key = await gateway.tenant("acme", **policy)
        for stdin in ("a", "b"):
            assert (await gateway.execute(key, {**body, "stdin": stdin})).status_code == 200
        assert (await gateway.execute(key, {**body, "stdin": "c"})).status_code == 429
        assert (await _admin(gateway, "DELETE", "/tenants/acme")).status_code == 204

        key = await gateway.tenant("acme", **policy)
        usage = (await _admin(gateway, "GET", "/tenants/acme/usage")).json()["days"][0]
        assert usage["executions"] == 0
        assert usage["rate_limited"] == 0
        first = await gateway.execute(key, {**body, "stdin": "d"})
        assert first.status_code == 200, first.text
        assert first.headers["x-ratelimit-remaining"] == "1"


class TestUsage:
    async def test_shape(self, gateway: Gateway) -> None:
        await _create(gateway)
        response = await _admin(gateway, "GET", "/tenants/acme/usage")
        assert response.status_code == 200, response.text
        usage = response.json()
        assert usage["tenant"] == "acme"
        days = usage["days"]
        today = datetime.now(UTC).date()
        assert [d["date"] for d in days] == [
            (today - timedelta(days=n)).isoformat() for n in range(len(days))
        ]
        assert len(days) == 7
        for day in days:
            assert set(day) == {
                "date",
                "executions",
                "cache_hits",
                "rate_limited",
                "errors",
                "cpu_time_ms",
                "wall_time_ms",
            }

    async def test_counts_executions(self, gateway: Gateway) -> None:
        key = await gateway.tenant("acme")
        body = {"language": "python", "version": "*", "files": [{"content": "print(2)"}]}
        assert (await gateway.execute(key, body)).status_code == 200
        today = (await _admin(gateway, "GET", "/tenants/acme/usage")).json()["days"][0]
        assert today["executions"] >= 1

    async def test_unknown_is_404(self, gateway: Gateway) -> None:
        response = await _admin(gateway, "GET", "/tenants/nobody/usage")
        assert response.status_code == 404


class TestOpenApi:
    async def test_admin_routes_documented(self, gateway: Gateway) -> None:
        schema = (await gateway.client.get("/openapi.json")).json()
        paths = schema["paths"]
        expected = {
            "/admin/tenants": {"post", "get"},
            "/admin/tenants/{tenant_id}": {"get", "patch", "delete"},
            "/admin/tenants/{tenant_id}/keys": {"post", "get"},
            "/admin/keys/{key_id}": {"delete"},
            "/admin/tenants/{tenant_id}/usage": {"get"},
        }
        for path, methods in expected.items():
            assert set(paths[path]) >= methods, path
            for method in methods:
                operation = paths[path][method]
                assert {"401", "403"} <= set(operation["responses"]), (path, method)
                assert operation["summary"], (path, method)
                assert operation.get("description"), (path, method)


BIG = 2**53  # one past the contract's largest integer
INTEGER_FIELDS = [
    ("max_concurrency", 1),
    ("daily_quota", 1),
    ("max_run_timeout", 1),
    ("max_compile_timeout", 1),
    ("max_run_cpu_time", 1),
    ("max_compile_cpu_time", 1),
    ("max_run_memory_limit", -1),
    ("max_compile_memory_limit", -1),
]


class TestStrictFields:
    """Every integer bounded, every field of its own JSON type only, on POST and on PATCH."""

    @pytest.mark.parametrize(("field", "minimum"), INTEGER_FIELDS)
    @pytest.mark.parametrize(
        "value",
        [BIG, 2**64, 2**70, 10**30, "5", 5.0, True],
        ids=["2^53", "2^64", "2^70", "1e30", "string", "float", "bool"],
    )
    @pytest.mark.parametrize("method", ["POST", "PATCH"])
    async def test_integer_field_refused(
        self, gateway: Gateway, field: str, minimum: int, value: object, method: str
    ) -> None:
        if method == "PATCH":
            await _create(gateway, {"id": "acme"})
            response = await _admin(gateway, "PATCH", "/tenants/acme", {field: value})
        else:
            response = await _admin(gateway, "POST", "/tenants", {"id": "acme", field: value})
        assert response.status_code == 400, response.text
        assert list(response.json()) == ["message"]
        assert response.json()["message"].startswith(f"{field}:")

    @pytest.mark.parametrize(("field", "minimum"), INTEGER_FIELDS)
    async def test_integer_bounds(self, gateway: Gateway, field: str, minimum: int) -> None:
        below = await _admin(gateway, "POST", "/tenants", {"id": "acme", field: minimum - 1})
        assert below.status_code == 400, below.text
        assert below.json()["message"].startswith(f"{field}:")
        at_minimum = await _admin(gateway, "POST", "/tenants", {"id": "acme", field: minimum})
        assert at_minimum.status_code == 201, at_minimum.text
        assert at_minimum.json()[field] == minimum

    async def test_largest_integer_is_stored(self, gateway: Gateway) -> None:
        created = await _admin(gateway, "POST", "/tenants", {"id": "acme", "daily_quota": BIG - 1})
        assert created.status_code == 201, created.text
        assert created.json()["daily_quota"] == BIG - 1

    @pytest.mark.parametrize("value", ["yes", 0, 1, "true", 1.0])
    async def test_boolean_field_refused(self, gateway: Gateway, value: object) -> None:
        response = await _admin(gateway, "POST", "/tenants", {"id": "acme", "cache": value})
        assert response.status_code == 400, response.text
        assert response.json()["message"].startswith("cache:")
        await _create(gateway, {"id": "acme"})
        patched = await _admin(gateway, "PATCH", "/tenants/acme", {"cache": value})
        assert patched.status_code == 400, patched.text
        assert patched.json()["message"].startswith("cache:")

    @pytest.mark.parametrize(
        "body",
        [{"id": "acme", "name": "Ac\x00me"}, {"id": "acme", "allowed_languages": ["py\x00"]}],
    )
    async def test_nul_is_400(self, gateway: Gateway, body: dict[str, Any]) -> None:
        response = await _admin(gateway, "POST", "/tenants", body)
        assert response.status_code == 400, response.text
        assert "NUL" in response.json()["message"]

    async def test_nul_in_key_name_is_400(self, gateway: Gateway) -> None:
        await _create(gateway, {"id": "acme"})
        response = await _admin(gateway, "POST", "/tenants/acme/keys", {"name": "a\x00b"})
        assert response.status_code == 400, response.text
        assert response.json()["message"].startswith("name:")


class TestRateLimitThatCannotRun:
    @pytest.mark.parametrize(
        ("limit", "says"),
        [
            ("0/minute", "allows no request"),
            ("0/second", "allows no request"),
            ("5/minute;0/hour", "allows no request"),
            ("1/0 second", "window of 0"),
            ("1/9999999999999999999 years", "above the maximum"),
            ("1/2 years", "longer than a year"),
            ("1/400 days", "longer than a year"),
            ("9999999999999999999999/second", "above the maximum"),
            (f"{2**53}/second", "above the maximum"),
        ],
    )
    @pytest.mark.parametrize("method", ["POST", "PATCH"])
    async def test_refused(self, gateway: Gateway, limit: str, says: str, method: str) -> None:
        if method == "PATCH":
            await _create(gateway, {"id": "acme"})
            response = await _admin(gateway, "PATCH", "/tenants/acme", {"rate_limit": limit})
        else:
            response = await _admin(
                gateway, "POST", "/tenants", {"id": "acme", "rate_limit": limit}
            )
        assert response.status_code == 400, response.text
        message = response.json()["message"]
        assert message.startswith("rate_limit:"), message
        assert says in message, message

    @pytest.mark.parametrize("limit", ["1/year", "1/365 days", "10/second;500/hour", "1/12 months"])
    async def test_accepted(self, gateway: Gateway, limit: str) -> None:
        response = await _admin(gateway, "POST", "/tenants", {"id": "acme", "rate_limit": limit})
        assert response.status_code == 201, response.text


class TestCapsWithinGlobalMaximums:
    @pytest.mark.parametrize(
        ("field", "value", "setting"),
        [
            ("max_run_timeout", 3001, "GATEWAY_MAX_RUN_TIMEOUT"),
            ("max_compile_timeout", 10_001, "GATEWAY_MAX_COMPILE_TIMEOUT"),
            ("max_run_cpu_time", 3001, "GATEWAY_MAX_RUN_CPU_TIME"),
            ("max_compile_cpu_time", 10_001, "GATEWAY_MAX_COMPILE_CPU_TIME"),
        ],
    )
    @pytest.mark.parametrize("method", ["POST", "PATCH"])
    async def test_above_the_global_maximum_is_400(
        self, gateway: Gateway, field: str, value: int, setting: str, method: str
    ) -> None:
        if method == "PATCH":
            await _create(gateway, {"id": "acme"})
            response = await _admin(gateway, "PATCH", "/tenants/acme", {field: value})
        else:
            response = await _admin(gateway, "POST", "/tenants", {"id": "acme", field: value})
        assert response.status_code == 400, response.text
        message = response.json()["message"]
        assert message.startswith(f"{field}:"), message
        assert f"global maximum of {value - 1}" in message, message
        assert setting in message, message
        if method == "PATCH":
            stored = await _admin(gateway, "GET", "/tenants/acme")
            assert stored.json()[field] is None  # nothing was stored

    async def test_at_the_global_maximum_is_stored(self, gateway: Gateway) -> None:
        response = await _admin(
            gateway, "POST", "/tenants", {"id": "acme", "max_run_timeout": 3000}
        )
        assert response.status_code == 201, response.text

    async def test_memory_cap_without_a_global_maximum(self, gateway: Gateway) -> None:
        # GATEWAY_MAX_RUN_MEMORY_LIMIT is -1 (none) by default: any bounded cap is the tenant's.
        body = {"id": "acme", "max_run_memory_limit": BIG - 1}
        response = await _admin(gateway, "POST", "/tenants", body)
        assert response.status_code == 201, response.text


ADMIN_BODY_ROUTES = [
    ("POST", "/admin/tenants"),
    ("PATCH", "/admin/tenants/acme"),
    ("POST", "/admin/tenants/acme/keys"),
]


class TestKeyBeforeBody:
    """The key is checked before the body is read or parsed, on every admin route with one."""

    @pytest.mark.parametrize(("method", "path"), ADMIN_BODY_ROUTES)
    @pytest.mark.parametrize("headers", [{}, {"X-API-Key": "pgw_wrong"}], ids=["none", "wrong"])
    async def test_malformed_body_without_key_is_401(
        self, gateway: Gateway, method: str, path: str, headers: dict[str, str]
    ) -> None:
        response = await gateway.client.request(
            method,
            path,
            content=b"{nope",
            headers={**headers, "Content-Type": "application/json"},
        )
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"] == "Bearer"

    @pytest.mark.parametrize(("method", "path"), ADMIN_BODY_ROUTES)
    async def test_body_is_not_read_without_key(
        self, gateway: Gateway, method: str, path: str
    ) -> None:
        read: list[int] = []

        async def body() -> Any:
            for _ in range(64):  # 4 MiB if read whole; the 401 must come before any of it
                read.append(1)
                yield b"x" * 65_536

        response = await gateway.client.request(
            method, path, content=body(), headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 401, response.text
        assert len(read) <= 1, f"{len(read)} chunks of the body were read before the 401"

    @pytest.mark.parametrize(("method", "path"), ADMIN_BODY_ROUTES)
    async def test_large_body_with_key_is_413(
        self, gateway: Gateway, method: str, path: str
    ) -> None:
        await _create(gateway, {"id": "acme"})
        big = b'{"name": "' + b"x" * 100_000 + b'"}'
        response = await gateway.client.request(
            method, path, content=big, headers={**ADMIN, "Content-Type": "application/json"}
        )
        assert response.status_code == 413, response.text
        assert list(response.json()) == ["message"]

    async def test_malformed_body_with_key_is_400(self, gateway: Gateway) -> None:
        response = await gateway.client.post(
            "/admin/tenants",
            content=b"{nope",
            headers={**ADMIN, "Content-Type": "application/json"},
        )
        assert response.status_code == 400
        assert response.json() == {"message": "request body is not valid JSON"}
