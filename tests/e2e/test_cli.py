"""`piston-gateway tenants|keys ...` as processes, against the Redis a running gateway uses."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support import RedisServer, Service, free_port, run_cli, start_gateway

ADMIN_KEY = "pgw_e2e_cli_admin_key_abcdefghijklmnopqrstuvwxyz012345"
ADMIN = {"X-API-Key": ADMIN_KEY}
_DB = 4


@pytest.fixture(scope="module")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url.rsplit("/", 1)[0] + f"/{_DB}"


@pytest.fixture(scope="module")
def server(redis_url: str, engine: Service) -> Iterator[Service]:
    service = start_gateway(redis_url=redis_url, piston_url=engine.url, admin_key=ADMIN_KEY)
    yield service
    service.stop()


def run(*args: str, redis_url: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    if redis_url is not None:
        env["GATEWAY_REDIS_URL"] = redis_url
    return run_cli(*args, env=env)  # its stderr and printed keys go to the log scan


def ok(*args: str, redis_url: str) -> str:
    result = run(*args, redis_url=redis_url)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _assert_one_line_error(result: subprocess.CompletedProcess[str], text: str) -> None:
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert text in lines[0]


class TestTenants:
    def test_create_then_the_api_sees_it(self, server: Service, redis_url: str) -> None:
        out = ok(
            "tenants",
            "create",
            "cli-acme",
            "--name",
            "Acme Inc",
            "--languages",
            "python,scala",
            "--rate-limit",
            "60/minute",
            "--max-concurrency",
            "4",
            "--daily-quota",
            "10000",
            "--max-run-timeout",
            "3000",
            "--no-cache",
            "--json",
            redis_url=redis_url,
        )
        created = json.loads(out)
        assert created["id"] == "cli-acme"
        seen = httpx.get(f"{server.url}/admin/tenants/cli-acme", headers=ADMIN)
        assert seen.status_code == 200
        tenant = seen.json()
        assert tenant["name"] == "Acme Inc"
        assert tenant["allowed_languages"] == ["python", "scala"]
        assert tenant["rate_limit"] == "60/minute"
        assert tenant["max_concurrency"] == 4
        assert tenant["daily_quota"] == 10000
        assert tenant["max_run_timeout"] == 3000
        assert tenant["cache"] is False

    def test_list_and_show(self, server: Service, redis_url: str) -> None:
        httpx.post(f"{server.url}/admin/tenants", json={"id": "api-made"}, headers=ADMIN)
        listed = ok("tenants", "list", redis_url=redis_url)
        assert listed.splitlines()[0].split()[0] == "ID"
        assert any(line.split()[0] == "api-made" for line in listed.splitlines()[1:])
        as_json: list[dict[str, Any]] = json.loads(
            ok("tenants", "list", "--json", redis_url=redis_url)
        )
        assert "api-made" in {t["id"] for t in as_json}
        shown = ok("tenants", "show", "api-made", redis_url=redis_url)
        assert "api-made" in shown
        assert (
            json.loads(ok("tenants", "show", "api-made", "--json", redis_url=redis_url))["id"]
            == "api-made"
        )

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (("tenants", "create", "Bad Id"), "is not a tenant id"),
            (("tenants", "create", "x1", "--rate-limit", "lots"), "rate_limit"),
            (("tenants", "create", "x2", "--max-concurrency", "0"), "max_concurrency"),
            (("tenants", "create", "x3", "--max-concurrency", "9" * 25), "max_concurrency"),
            (("tenants", "create", "x4", "--daily-quota", str(2**64)), "daily_quota"),
            (
                ("tenants", "create", "x5", "--max-run-timeout", "999999"),
                "max_run_timeout: 999999 is above the global maximum of 3000",
            ),
            (("tenants", "create", "x6", "--rate-limit", "0/minute"), "allows no request"),
            (("tenants", "create", "x7", "--rate-limit", "1/0 second"), "window of 0"),
            (("tenants", "delete", "nobody"), "tenant 'nobody' does not exist"),
            (("tenants", "show", "nobody"), "tenant 'nobody' does not exist"),
        ],
    )
    def test_errors(self, redis_url: str, args: tuple[str, ...], message: str) -> None:
        _assert_one_line_error(run(*args, redis_url=redis_url), message)

    def test_delete_then_recreate_starts_from_zero(self, server: Service, redis_url: str) -> None:
        body = {"language": "python", "version": "*", "files": [{"content": "print(5)"}]}

        def execute(key: str, stdin: str) -> int:
            return httpx.post(
                f"{server.url}/api/v2/execute",
                json={**body, "stdin": stdin},
                headers={"Authorization": f"Bearer {key}"},
                timeout=30,
            ).status_code

        ok("tenants", "create", "cli-reborn", "--daily-quota", "1", redis_url=redis_url)
        key = ok("keys", "create", "cli-reborn", redis_url=redis_url).strip()
        assert execute(key, "a") == 200
        assert execute(key, "b") == 429  # the day's quota is spent
        ok("tenants", "delete", "cli-reborn", redis_url=redis_url)
        ok("tenants", "create", "cli-reborn", "--daily-quota", "1", redis_url=redis_url)
        key = ok("keys", "create", "cli-reborn", redis_url=redis_url).strip()
        assert execute(key, "c") == 200  # a new tenant under the old id: a fresh quota
        usage = httpx.get(f"{server.url}/admin/tenants/cli-reborn/usage", headers=ADMIN).json()
        assert usage["days"][0]["executions"] == 1

    def test_duplicate(self, redis_url: str) -> None:
        ok("tenants", "create", "cli-dup", redis_url=redis_url)
        _assert_one_line_error(
            run("tenants", "create", "cli-dup", redis_url=redis_url), "already exists"
        )


class TestKeys:
    def test_key_lifecycle_seen_by_the_server(self, server: Service, redis_url: str) -> None:
        ok("tenants", "create", "cli-keys", redis_url=redis_url)
        result = run(
            "keys", "create", "cli-keys", "--name", "ci", "--expires-in", "30d", redis_url=redis_url
        )
        assert result.returncode == 0, result.stderr
        key = result.stdout.strip()
        assert key.startswith("pgw_")
        assert result.stdout == key + "\n"  # the key alone on stdout, so $(...) captures it
        assert "cannot be shown again" in result.stderr
        assert key not in result.stderr
        headers = {"Authorization": f"Bearer {key}"}
        assert httpx.get(f"{server.url}/api/v2/runtimes", headers=headers).status_code == 200

        listed: list[dict[str, Any]] = json.loads(
            ok("keys", "list", "cli-keys", "--json", redis_url=redis_url)
        )
        assert len(listed) == 1
        assert listed[0]["prefix"] == key[:12]
        assert listed[0]["name"] == "ci"
        assert listed[0]["expires_at"] is not None
        table = ok("keys", "list", "cli-keys", redis_url=redis_url)
        assert key not in table
        assert key[:12] in table

        ok("keys", "revoke", listed[0]["id"], redis_url=redis_url)
        deadline = time.monotonic() + 2
        while httpx.get(f"{server.url}/api/v2/runtimes", headers=headers).status_code != 401:
            assert time.monotonic() < deadline, "revoked key still accepted after 2 s"
            time.sleep(0.02)
        assert "revoked" in ok("keys", "list", "cli-keys", redis_url=redis_url)

    def test_admin_key(self, server: Service, redis_url: str) -> None:
        ok("tenants", "create", "cli-admin", redis_url=redis_url)
        minted = json.loads(
            ok("keys", "create", "cli-admin", "--admin", "--json", redis_url=redis_url)
        )
        assert minted["scopes"] == ["execute", "admin"]
        response = httpx.get(f"{server.url}/admin/tenants", headers={"X-API-Key": minted["key"]})
        assert response.status_code == 200

    def test_browser_key(self, server: Service, redis_url: str) -> None:
        ok("tenants", "create", "cli-browser", redis_url=redis_url)
        minted = json.loads(
            ok(
                "keys",
                "create",
                "cli-browser",
                "--origin",
                "https://App.example.com:443",
                "--origin",
                "http://localhost:5173",
                "--client-rate-limit",
                "10/minute",
                "--json",
                redis_url=redis_url,
            )
        )
        assert minted["allowed_origins"] == ["https://app.example.com", "http://localhost:5173"]
        assert minted["client_rate_limit"] == "10/minute"
        auth = {"Authorization": f"Bearer {minted['key']}"}
        url = f"{server.url}/api/v2/runtimes"
        assert httpx.get(url, headers=auth).status_code == 403
        local = httpx.get(url, headers={**auth, "Origin": "http://localhost:5173"})
        assert local.status_code == 200
        assert local.headers["access-control-allow-origin"] == "http://localhost:5173"
        ordinary = json.loads(ok("keys", "create", "cli-browser", "--json", redis_url=redis_url))
        assert ordinary["allowed_origins"] is None
        assert ordinary["client_rate_limit"] is None

    def test_api_minted_key_listed_by_cli(self, server: Service, redis_url: str) -> None:
        httpx.post(f"{server.url}/admin/tenants", json={"id": "api-keys"}, headers=ADMIN)
        minted = httpx.post(
            f"{server.url}/admin/tenants/api-keys/keys", json={}, headers=ADMIN
        ).json()
        assert minted["id"] in ok("keys", "list", "api-keys", redis_url=redis_url)

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (("keys", "create", "nobody"), "tenant 'nobody' does not exist"),
            (("keys", "create", "cli-keys", "--expires-in", "soon"), "--expires-in"),
            (("keys", "create", "cli-keys", "--expires-in", "99999999d"), "100 years"),
            (("keys", "create", "cli-keys", "--expires-in", "9" * 30 + "w"), "100 years"),
            (("keys", "create", "cli-keys", "--origin", "app.example.com"), "--origin"),
            (("keys", "create", "cli-keys", "--origin", "https://a.example/x"), "not an origin"),
            (
                ("keys", "create", "cli-keys", "--admin", "--origin", "https://a.example"),
                "cannot have the admin scope",
            ),
            (("keys", "create", "cli-keys", "--client-rate-limit", "lots"), "--client-rate-limit"),
            (("keys", "create", "cli-keys", "--client-rate-limit", "0/minute"), "allows no"),
            (("keys", "list", "nobody"), "tenant 'nobody' does not exist"),
            (
                ("keys", "revoke", "key_0000000000000000"),
                "key 'key_0000000000000000' does not exist",
            ),
        ],
    )
    def test_errors(self, redis_url: str, args: tuple[str, ...], message: str) -> None:
        _assert_one_line_error(run(*args, redis_url=redis_url), message)


class TestWithoutRedis:
    def test_no_redis_url(self) -> None:
        _assert_one_line_error(run("tenants", "list", redis_url=None), "GATEWAY_REDIS_URL")

    def test_redis_unreachable(self) -> None:
        url = f"redis://127.0.0.1:{free_port()}/0"
        for args in (("tenants", "list"), ("keys", "create", "x")):
            _assert_one_line_error(run(*args, redis_url=url), "cannot reach Redis at 127.0.0.1")
