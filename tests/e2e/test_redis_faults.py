"""Redis killed (SIGKILL) and hung (SIGSTOP) under load, over two real gateway processes.

Each fail mode gets its own redis-server (killing the suite's would break other tests) and two
`piston-gateway serve` processes on it. The load mixes a key the gateways have already verified
(its answer cached) and keys they have never seen. The contract: never a 500; failing closed is
503 with Retry-After; failing open serves the verified key with `X-Cache: BYPASS` and answers
the unseen ones 503 (never 401); recovery within 5 s of Redis coming back, without a restart;
the outage logged when it starts and ends, not per request, and no traceback.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import orjson
import pytest
import redis
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.support import RedisServer, Service, start_gateway

ADMIN_KEY = "pgw_e2e_admin_key_for_the_redis_fault_test_0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CODE = {"language": "python", "version": "*", "files": [{"content": "print('fault')"}]}
RECOVERY_S = 5.0  # the contract's bound
LOAD_S = 2.0  # each outage phase: a bounded load, in time and in count
LOAD_MAX_S = 6.0  # on a busy machine, longer, until LOAD_MIN_REQUESTS were answered
LOAD_MIN_REQUESTS = 60
LOAD_MAX_REQUESTS = 400
CONCURRENCY = 8
UNSEEN_KEYS = 12


@dataclass
class Tally:
    """What the clients saw in one phase, by kind of key."""

    verified: Counter[int] = field(default_factory=Counter)
    unseen: Counter[int] = field(default_factory=Counter)
    bypass: int = 0
    problems: list[str] = field(default_factory=list)
    messages: Counter[str] = field(default_factory=Counter)  # of the refusals, for a failure


def _check_error_shape(response: httpx.Response, tally: Tally) -> None:
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        tally.problems.append(f"{response.status_code} not JSON: {response.text[:80]}")
        return
    if not isinstance(body, dict) or not isinstance(body.get("message"), str):
        tally.problems.append(f"{response.status_code} not {{message}}: {response.text[:80]}")
    if response.status_code == 503 and not response.headers.get("retry-after", "").isdigit():
        tally.problems.append("503 without Retry-After")


async def _load(gateways: list[Service], verified: str, unseen: list[str]) -> Tally:
    """Cache hits with the verified key and lookups of unseen keys, over both gateways."""
    tally = Tally()
    started = time.monotonic()
    sent = 0

    def more() -> bool:
        elapsed = time.monotonic() - started
        if sent >= LOAD_MAX_REQUESTS or elapsed >= LOAD_MAX_S:
            return False
        return elapsed < LOAD_S or sent < LOAD_MIN_REQUESTS

    async def worker(client: httpx.AsyncClient, n: int) -> None:
        nonlocal sent
        while more():
            sent += 1
            gateway = gateways[sent % len(gateways)]
            is_verified = (sent + n) % 2 == 0
            key = verified if is_verified else unseen[sent % len(unseen)]
            try:
                response = await client.post(
                    f"{gateway.url}/api/v2/execute",
                    json=CODE,
                    headers={"Authorization": f"Bearer {key}"},
                )
            except httpx.HTTPError as exc:
                tally.problems.append(f"transport error {type(exc).__name__}")
                continue
            (tally.verified if is_verified else tally.unseen)[response.status_code] += 1
            if response.status_code == 200 and response.headers.get("x-cache") == "BYPASS":
                tally.bypass += 1
            if response.status_code != 200:
                _check_error_shape(response, tally)
                kind = "verified" if is_verified else "unseen"
                tally.messages[f"{kind} {response.status_code} {response.text[:90]}"] += 1

    async with httpx.AsyncClient(timeout=10) as client:
        await asyncio.gather(*(worker(client, n) for n in range(CONCURRENCY)))
    return tally


def _execute(gateway: Service, key: str) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/api/v2/execute",
        json=CODE,
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )


def _recovered_within(gateways: list[Service], verified: str, unseen: str) -> float:
    """Seconds until both gateways serve both keys from Redis again (counted, not bypassed)."""
    started = time.monotonic()
    while time.monotonic() - started < RECOVERY_S + 5:
        answers = [_execute(g, k) for g in gateways for k in (verified, unseen)]
        if all(a.status_code == 200 and a.headers.get("x-cache") != "BYPASS" for a in answers):
            return time.monotonic() - started
        time.sleep(0.1)
    statuses = [(a.status_code, a.headers.get("x-cache"), a.text[:80]) for a in answers]
    raise AssertionError(f"not recovered after {RECOVERY_S + 5}s: {statuses}")


def _log_lines(gateway: Service) -> list[dict[str, object]]:
    lines = []
    for raw in gateway.log().splitlines():
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            line = {"event": raw, "level": "raw"}
        if isinstance(line, dict) and line.get("logger") != "app.access":
            lines.append(line)
    return lines


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        os.kill(server.proc.pid, signal.SIGCONT)
    server.stop()


@pytest.mark.parametrize("fail_open", [False, True], ids=["fail-closed", "fail-open"])
def test_redis_killed_and_hung_under_load(
    own_redis: RedisServer, engine: Service, fail_open: bool
) -> None:
    env = {
        "GATEWAY_RATE_LIMIT_FAIL_OPEN": "true" if fail_open else "false",
        "GATEWAY_DEFAULT_RATE_LIMIT": "1000000/minute",
    }
    gateways: list[Service] = []
    try:
        for _ in range(2):
            gateways.append(
                start_gateway(
                    redis_url=own_redis.url, piston_url=engine.url, admin_key=ADMIN_KEY, env=env
                )
            )
        _run_faults(own_redis, gateways, fail_open=fail_open)
    finally:
        for gateway in gateways:
            gateway.stop()


def _assert_websocket_says_try_later(gateway: Service, key: str) -> None:
    """A key that cannot be checked is not an invalid one: told so, and closed 1013."""
    url = gateway.url.replace("http://", "ws://") + "/api/v2/connect"
    received: list[dict[str, object]] = []
    with connect(url, additional_headers={"X-API-Key": key}, open_timeout=10) as socket:
        try:
            while True:
                received.append(orjson.loads(socket.recv(timeout=10)))
        except ConnectionClosed:
            pass
        assert socket.protocol.close_rcvd is not None
        code = socket.protocol.close_rcvd.code
    assert code == 1013, (code, received)
    assert received, received
    assert received[0]["type"] == "error", received
    assert "unavailable" in str(received[0]["message"]), received


def _mint_keys(gateway: Service, count: int) -> list[str]:
    created = httpx.post(f"{gateway.url}/admin/tenants", json={"id": "faults"}, headers=ADMIN)
    assert created.status_code == 201, created.text
    keys = []
    for _ in range(count):
        minted = httpx.post(f"{gateway.url}/admin/tenants/faults/keys", json={}, headers=ADMIN)
        assert minted.status_code == 201, minted.text
        keys.append(str(minted.json()["key"]))
    return keys


def _assert_outage(tally: Tally, *, fail_open: bool, phase: str) -> None:
    seen = (
        f"{phase}: verified {dict(tally.verified)}, unseen {dict(tally.unseen)},"
        f" answers {dict(tally.messages)}"
    )
    assert not tally.problems, f"{seen}: {tally.problems[:5]}"
    # Enough load that one log line per request would show (the bound below is 16).
    assert sum(tally.verified.values()) + sum(tally.unseen.values()) > 30, seen
    assert 500 not in tally.verified, seen
    assert 500 not in tally.unseen, seen
    # An unseen key cannot be checked: 503, never 401 (a request already past the lookup when
    # Redis went away may still have been answered).
    assert set(tally.unseen) <= {200, 503}, seen
    assert tally.unseen[503] > 0, seen
    if fail_open:
        assert set(tally.verified) == {200}, seen
        assert tally.bypass > 0, seen
    else:
        assert set(tally.verified) <= {200, 503}, seen
        assert tally.verified[503] > tally.verified[200], seen


def _run_faults(server: RedisServer, gateways: list[Service], *, fail_open: bool) -> None:
    assert server.proc is not None
    verified, *unseen = _mint_keys(gateways[0], 1 + UNSEEN_KEYS)
    for gateway in gateways:  # each process verifies the key and the answer is cached
        for _ in range(2):
            assert _execute(gateway, verified).status_code == 200
    assert _execute(gateways[0], verified).headers.get("x-cache") == "HIT"
    # Saved, so that the restarted server loads the tenant and its keys again.
    redis.Redis.from_url(server.url).save()

    # 1. Killed: connections refused at once.
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait()
    killed = asyncio.run(_load(gateways, verified, unseen))
    _assert_outage(killed, fail_open=fail_open, phase="killed")
    _assert_websocket_says_try_later(gateways[1], unseen[-1])
    server.start()  # same port, same dir: the dump is loaded
    recovered = _recovered_within(gateways, verified, unseen[0])
    assert recovered <= RECOVERY_S, f"recovered after a kill in {recovered:.1f}s"

    # 2. Hung: the socket stays open and nothing answers.
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        hung = asyncio.run(_load(gateways, verified, unseen[1:]))
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    _assert_outage(hung, fail_open=fail_open, phase="hung")
    recovered = _recovered_within(gateways, verified, unseen[1])
    assert recovered <= RECOVERY_S, f"recovered after a hang in {recovered:.1f}s"

    for gateway in gateways:
        lines = _log_lines(gateway)
        text = gateway.log()
        assert "Traceback" not in text, text[-3000:]
        assert not [line for line in lines if line.get("event") == "unhandled_error"]
        noisy = [line for line in lines if line.get("level") in ("warning", "error", "raw")]
        # Two outages, each a start and an end per Redis user: a handful, not one per request.
        assert len(noisy) <= 16, [line.get("event") for line in noisy]
        starts = [line for line in lines if line.get("event") == "redis_unavailable"]
        ends = [line for line in lines if line.get("event") == "redis_recovered"]
        events = [line.get("event") for line in lines]
        assert 1 <= len(starts) <= 4, events
        assert 1 <= len(ends) <= 4, events
