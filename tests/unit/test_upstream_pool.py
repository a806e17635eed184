"""PistonPool's choices, with scripted transports (faults a real upstream can't give on demand)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import orjson
import pytest

from app.errors import ServiceUnavailable
from app.protocol.resolve import Runtime
from app.upstream.pool import PistonPool

PYTHON = Runtime("python", "3.12.0", ("py",))
ANSWER = {"language": "python", "version": "3.12.0", "run": {"stdout": "", "status": None}}


def _pool(urls: list[str], handler: httpx.MockTransport) -> PistonPool:
    pool = PistonPool(urls, connect_timeout=1, transport=handler)
    for upstream in pool.upstreams:
        upstream.healthy = True
        upstream.runtimes = (PYTHON,)
    return pool


async def test_a_connect_timeout_fails_over_like_a_refusal() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url.host))
        if request.url.host == "blackhole":
            raise httpx.ConnectTimeout("SYN dropped")
        return httpx.Response(200, content=orjson.dumps(ANSWER))

    pool = _pool(["http://blackhole:2000", "http://good:2000"], httpx.MockTransport(handler))
    answer = await pool.execute(b"{}", runtime=PYTHON, read_timeout=5)
    assert answer.status_code == 200
    assert seen == ["blackhole", "good"]
    assert pool.upstreams[0].healthy is False  # the job never started there
    await pool.close()


async def test_no_upstream_answers_is_503() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    pool = _pool(["http://a:2000", "http://b:2000"], httpx.MockTransport(handler))
    with pytest.raises(ServiceUnavailable):
        await pool.execute(b"{}", runtime=PYTHON, read_timeout=5)
    await pool.close()


async def test_a_path_prefix_in_the_upstream_url_is_kept() -> None:
    paths: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        return httpx.Response(200, content=orjson.dumps(ANSWER))

    pool = _pool(["http://proxy:8080/piston/"], httpx.MockTransport(handler))
    await pool.execute(b"{}", runtime=PYTHON, read_timeout=5)
    await pool.forward("GET", "/api/v2/packages")
    assert paths == ["/piston/api/v2/execute", "/piston/api/v2/packages"]
    await pool.close()


async def test_the_least_busy_healthy_upstream_with_the_runtime_goes_first() -> None:
    pool = _pool(
        ["http://a:2000", "http://b:2000", "http://c:2000"],
        httpx.MockTransport(lambda r: httpx.Response(200)),
    )
    a, b, c = pool.upstreams
    a.in_flight, b.in_flight, c.in_flight = 5, 1, 0
    c.runtimes = ()  # c lacks python
    assert [u.url for u in pool.candidates(PYTHON)] == [b.url, a.url]
    await pool.close()


async def test_no_healthy_upstream_is_503_at_once_without_a_request() -> None:
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(str(request.url))
        return httpx.Response(200, content=orjson.dumps(ANSWER))

    pool = _pool(["http://a:2000", "http://b:2000"], httpx.MockTransport(handler))
    for upstream in pool.upstreams:
        upstream.healthy = False  # as the health check left them
    with pytest.raises(ServiceUnavailable):
        await pool.execute(b"{}", runtime=PYTHON, read_timeout=15)
    with pytest.raises(ServiceUnavailable):
        await pool.forward("GET", "/api/v2/packages")
    assert sent == []  # nothing waited on an upstream known down
    await pool.close()


async def test_an_upstream_known_unhealthy_is_not_tried_when_a_healthy_one_exists() -> None:
    hosts: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(str(request.url.host))
        if request.url.host == "hung":
            await asyncio.sleep(3600)
        return httpx.Response(200, content=orjson.dumps(ANSWER))

    pool = _pool(["http://hung:2000", "http://good:2000"], httpx.MockTransport(handler))
    hung, _ = pool.upstreams
    hung.healthy = False
    hung.in_flight = -5  # the least busy by far: still not chosen
    answer = await pool.execute(b"{}", runtime=PYTHON, read_timeout=15)
    assert answer.status_code == 200
    assert hosts == ["good"]
    await pool.close()


class _Scripted:
    """Each host's health-check behaviour, switched by the test: ok, refuse, hang, garbage."""

    def __init__(self) -> None:
        self.mode: dict[str, str] = {}
        self.body = orjson.dumps([{"language": "python", "version": "3.12.0", "aliases": []}])
        self.probes = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.probes += 1
        mode = self.mode.get(str(request.url.host), "ok")
        if mode == "refuse":
            raise httpx.ConnectError("connection refused")
        if mode == "hang":
            await asyncio.sleep(3600)
        if mode == "garbage":
            return httpx.Response(200, content=b"<html>")
        return httpx.Response(200, content=self.body)


async def _wait(condition: Callable[[], bool], within: float) -> float:
    started = time.monotonic()
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110  # the probes run in the background
            await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_the_health_check_sees_refused_hung_and_recovered_upstreams() -> None:
    script = _Scripted()
    pool = PistonPool(
        ["http://a:2000", "http://b:2000"],
        connect_timeout=1,
        health_seconds=0.1,
        transport=httpx.MockTransport(script),
    )
    await pool.start()
    a, b = pool.upstreams
    try:
        assert a.healthy
        assert b.healthy
        assert a.runtimes == (Runtime("python", "3.12.0", ()),)

        script.mode["a"] = "refuse"
        await _wait(lambda: not a.healthy, 1.0)
        assert a.last_error == "ConnectError"
        assert b.healthy

        script.mode["b"] = "hang"  # accepts, never answers: down once its 2 s bound passes
        took = await _wait(lambda: not b.healthy, 3.0)
        assert took >= 1.9
        assert b.last_error == "no answer within 2 s"

        script.mode.clear()
        await _wait(lambda: a.healthy and b.healthy, 3.0)
        errors: tuple[str | None, str | None] = (a.last_error, b.last_error)
        assert errors == (None, None)

        script.mode["a"] = "garbage"
        await _wait(lambda: not a.healthy, 1.0)
        assert a.last_error == "answered a malformed runtime list (JSONDecodeError)"
    finally:
        await pool.close()


async def test_an_unchanged_runtime_list_is_not_parsed_again() -> None:
    script = _Scripted()
    pool = PistonPool(["http://a:2000"], connect_timeout=1, transport=httpx.MockTransport(script))
    await pool.start()
    try:
        version, runtimes = pool.version, pool.upstreams[0].runtimes
        await pool.refresh()
        await pool.refresh()
        assert pool.version == version
        assert pool.upstreams[0].runtimes is runtimes  # the same tuple: nothing re-parsed
        script.body = orjson.dumps([{"language": "scala", "version": "3.0.0", "aliases": []}])
        await pool.refresh()
        assert pool.version > version
        assert [rt.language for rt in pool.runtimes] == ["scala"]
    finally:
        await pool.close()
