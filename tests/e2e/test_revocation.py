"""Two real gateway processes on one Redis: a key revoked on one is refused by the other within
2 s, and neither process ever logs a key."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support import RedisServer, Service, start_gateway

ADMIN_KEY = "pgw_e2e_admin_key_abcdefghijklmnopqrstuvwxyz0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
_DB = 3


def _start_gateway(redis_url: str, engine: Service) -> Service:
    return start_gateway(
        redis_url=redis_url,
        piston_url=engine.url,
        admin_key=ADMIN_KEY,
        env={"GATEWAY_LOG_LEVEL": "debug"},  # the most there is to log, for the no-key check
    )


@pytest.fixture(scope="module")
def replicas(redis_server: RedisServer, engine: Service) -> Iterator[tuple[Service, Service]]:
    redis_url = redis_server.url.rsplit("/", 1)[0] + f"/{_DB}"
    first = _start_gateway(redis_url, engine)
    try:
        second = _start_gateway(redis_url, engine)
    except Exception:
        first.stop()
        raise
    yield first, second
    first.stop()
    second.stop()


def _mint(gateway: Service, tenant_id: str) -> dict[str, str]:
    created = httpx.post(f"{gateway.url}/admin/tenants", json={"id": tenant_id}, headers=ADMIN)
    assert created.status_code == 201, created.text
    minted = httpx.post(f"{gateway.url}/admin/tenants/{tenant_id}/keys", json={}, headers=ADMIN)
    assert minted.status_code == 201, minted.text
    key: dict[str, str] = minted.json()
    return key


def _status(gateway: Service, key: str) -> int:
    return httpx.get(f"{gateway.url}/api/v2/runtimes", headers={"X-API-Key": key}).status_code


def _seconds_until_refused(gateway: Service, key: str, limit: float) -> float:
    started = time.monotonic()
    while _status(gateway, key) != 401:
        if time.monotonic() - started > limit:
            pytest.fail(f"key still accepted {limit}s after its revocation")
        time.sleep(0.02)
    return time.monotonic() - started


def _until_logged(gateway: Service, request_id: str, *, within: float = 5) -> None:
    """Until the access line of request `request_id` is in the gateway's log: it is written
    after the answer has gone, and it is the request's last line."""
    deadline = time.monotonic() + within
    while True:
        for line in gateway.log().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # not JSON (the log scan reports those), or still being written
            if (
                isinstance(entry, dict)
                and entry.get("event") == "request"
                and (entry.get("request_id") == request_id)
            ):
                return
        assert time.monotonic() < deadline, f"request {request_id} not logged in {within}s"
        time.sleep(0.02)


class TestRevocationAcrossReplicas:
    def test_revoked_on_one_refused_by_the_other(self, replicas: tuple[Service, Service]) -> None:
        first, second = replicas
        minted = _mint(first, "revoke-e2e")
        # Warm both processes' caches: each has now served the key from memory.
        for _ in range(3):
            assert _status(first, minted["key"]) == 200
            assert _status(second, minted["key"]) == 200
        revoked = httpx.delete(f"{first.url}/admin/keys/{minted['id']}", headers=ADMIN)
        assert revoked.status_code == 204
        assert _seconds_until_refused(second, minted["key"], 2.0) < 2.0
        assert _status(first, minted["key"]) == 401

    def test_deleted_tenant_refused_by_the_other(self, replicas: tuple[Service, Service]) -> None:
        first, second = replicas
        minted = _mint(first, "delete-e2e")
        assert _status(second, minted["key"]) == 200
        deleted = httpx.delete(f"{first.url}/admin/tenants/delete-e2e", headers=ADMIN)
        assert deleted.status_code == 204
        _seconds_until_refused(second, minted["key"], 2.0)

    def test_tenant_minted_on_one_works_on_the_other_at_once(
        self, replicas: tuple[Service, Service]
    ) -> None:
        first, second = replicas
        assert _status(second, "pgw_not_yet_a_key") == 401
        minted = _mint(first, "mint-e2e")
        assert _status(second, minted["key"]) == 200


class TestLogs:
    def test_no_key_in_any_log_line(self, replicas: tuple[Service, Service]) -> None:
        first, second = replicas
        minted = _mint(first, "logs-e2e")
        key = minted["key"]
        unknown = "pgw_" + "u" * 43
        for gateway in replicas:
            for headers in (
                {"Authorization": f"Bearer {key}"},
                {"X-API-Key": key},
                {"Authorization": key},
                {"X-API-Key": unknown},
                {"Authorization": "Bearer pgw_short"},
            ):
                httpx.get(f"{gateway.url}/api/v2/runtimes", headers=headers)
                httpx.get(f"{gateway.url}/admin/tenants", headers=headers)
            httpx.get(f"{gateway.url}/admin/tenants/logs-e2e/keys", headers=ADMIN)
        last = {"X-Request-ID": "logs-e2e-last"}
        httpx.delete(f"{first.url}/admin/keys/{minted['id']}", headers={**ADMIN, **last})
        httpx.get(f"{second.url}/api/v2/runtimes", headers={"X-API-Key": key, **last})
        for gateway in replicas:  # the last lines have reached the log files
            _until_logged(gateway, "logs-e2e-last")
        logs = first.log() + second.log()
        assert minted["prefix"] in logs  # requests were logged, by prefix
        for secret in (key, key[12:], unknown, unknown[12:], ADMIN_KEY, ADMIN_KEY[12:]):
            assert secret not in logs
