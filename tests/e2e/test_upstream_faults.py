"""The upstream killed, restarted, hung and resumed under a gateway process: /readyz within 5 s.

A real engine process of the test's own (so it can be killed and stopped) behind a real
`piston-gateway serve`; every wait polls with the contract's bound as its deadline.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import E2E_ADMIN_KEY
from tests.support import RedisServer, Service, mint_key, start_engine, start_gateway

READY_WITHIN_S = 5.0  # the contract: unhealthy within 5 s, healthy again within 5 s
AT_ONCE_S = 1.0  # "503 at once", not after the 4 s deadline below
# Short stages, so the deadline of an execute caught by the hang is stages + grace = 4 s.
PY: dict[str, Any] = {
    "language": "python",
    "version": "3",
    "files": [{"content": "print('up')"}],
    "compile_timeout": 1000,
    "run_timeout": 1000,
}
DEADLINE_S = 2.0 + 2.0  # both stages' timeouts + GATEWAY_UPSTREAM_GRACE_MS (2000 by default)


class Probe:
    """The gateway as a client sees it, every status recorded (no 500 may appear)."""

    def __init__(self, gateway: Service, key: str) -> None:
        self.gateway = gateway
        self.key = key
        self.statuses: list[int] = []
        self.lock = threading.Lock()

    def _seen(self, status: int) -> None:
        with self.lock:
            self.statuses.append(status)

    def readyz(self) -> httpx.Response:
        response = httpx.get(f"{self.gateway.url}/readyz", timeout=10)
        self._seen(response.status_code)
        return response

    def execute(self) -> tuple[httpx.Response, float]:
        started = time.monotonic()
        response = httpx.post(
            f"{self.gateway.url}/api/v2/execute",
            json=PY,
            headers={"Authorization": f"Bearer {self.key}", "Cache-Control": "no-store"},
            timeout=30,
        )
        self._seen(response.status_code)
        return response, time.monotonic() - started

    def ready_becomes(self, status: int, *, since: float) -> float:
        """Seconds from `since` until /readyz answers `status`; fails past the contract's 5 s."""
        deadline = since + READY_WITHIN_S
        last = None
        while time.monotonic() < deadline:
            last = self.readyz()
            if last.status_code == status:
                return time.monotonic() - since
            time.sleep(0.05)
        body = last.text if last is not None else ""
        pytest.fail(f"/readyz not {status} within {READY_WITHIN_S} s: {body}")


@pytest.fixture
def own_engine() -> Iterator[list[Service]]:
    """An engine only this test uses; the list holds the current process across restarts."""
    engines = [start_engine()]
    yield engines
    for engine in engines:
        if engine.proc is not None and engine.proc.poll() is None:
            os.kill(engine.proc.pid, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        engine.stop()


@pytest.fixture
def faults_gateway(redis_server: RedisServer, own_engine: list[Service]) -> Iterator[Service]:
    gateway = start_gateway(
        redis_url=redis_server.url, piston_url=own_engine[0].url, admin_key=E2E_ADMIN_KEY
    )
    yield gateway
    gateway.stop()


def _is_message(response: httpx.Response) -> bool:
    body = response.json()
    return set(body) == {"message"} and isinstance(body["message"], str)


def test_killed_restarted_hung_and_resumed_upstream(
    own_engine: list[Service], faults_gateway: Service
) -> None:
    probe = Probe(faults_gateway, mint_key(faults_gateway, E2E_ADMIN_KEY, "upstream-faults"))
    engine = own_engine[0]
    assert engine.proc is not None
    assert probe.readyz().status_code == 200
    assert probe.execute()[0].status_code == 200

    # Killed: refused connections. Unready within 5 s; executes a 503 {"message"} at once.
    engine.proc.kill()
    engine.proc.wait()
    killed_at = time.monotonic()
    took_down = probe.ready_becomes(503, since=killed_at)
    body = probe.readyz().json()
    assert body["status"] == "unavailable"
    assert body["upstreams"][0]["healthy"] is False
    response, elapsed = probe.execute()
    assert response.status_code == 503
    assert _is_message(response)
    assert elapsed < AT_ONCE_S

    # Restarted on the same port: ready again within 5 s of answering, executes work.
    restarted = Service(engine.argv, engine.port)
    own_engine.append(restarted)
    restarted.start(ready_path="/api/v2/runtimes")  # returns once the engine answers
    took_up = probe.ready_becomes(200, since=time.monotonic())
    assert probe.readyz().json()["upstreams"][0]["healthy"] is True
    assert probe.execute()[0].status_code == 200
    assert restarted.proc is not None

    # Hung (SIGSTOP): connections are accepted, nothing answers. An execute already on its way
    # gets its 504 by its deadline (or a 503 if the health check was faster); the gateway is
    # unready within 5 s; executes after that are a 503 at once, not a wait for the deadline.
    caught: list[tuple[httpx.Response, float]] = []
    os.kill(restarted.proc.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    in_flight = threading.Thread(target=lambda: caught.append(probe.execute()))
    in_flight.start()
    took_hung = probe.ready_becomes(503, since=stopped_at)
    response, elapsed = probe.execute()
    assert response.status_code == 503
    assert _is_message(response)
    assert elapsed < AT_ONCE_S
    in_flight.join(timeout=DEADLINE_S + 10)
    ((caught_response, caught_elapsed),) = caught
    assert caught_response.status_code in (503, 504)
    assert _is_message(caught_response)
    assert caught_elapsed < DEADLINE_S + 1.0

    # Resumed (SIGCONT): healthy within 5 s, executes work.
    os.kill(restarted.proc.pid, signal.SIGCONT)
    took_back = probe.ready_becomes(200, since=time.monotonic())
    assert probe.execute()[0].status_code == 200

    assert 500 not in probe.statuses
    log = faults_gateway.log()
    assert "Traceback" not in log
    logging.getLogger(__name__).info(  # the figures for the record (pytest --log-cli-level)
        f"readyz 503 after kill {took_down:.2f}s, 200 after restart {took_up:.2f}s, "
        f"503 after stop {took_hung:.2f}s, 200 after cont {took_back:.2f}s; "
        f"execute caught by the hang {caught_response.status_code} in {caught_elapsed:.2f}s, "
        f"after unready 503 in {elapsed:.2f}s"
    )
