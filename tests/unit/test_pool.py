"""PistonPool's choices, with scripted transports (faults a real upstream can't give on demand)."""

from __future__ import annotations

import httpx
import orjson
import pytest

from app.errors import ServiceUnavailable
from app.piston.client import PistonPool
from app.piston.resolve import Runtime

PYTHON = Runtime("python", "3.12.0", ("py",))
ANSWER = {"language": "python", "version": "3.12.0", "run": {"stdout": "", "status": None}}


def _pool(urls: list[str], handler: httpx.MockTransport) -> PistonPool:
    pool = PistonPool(urls, connect_timeout=1, refresh_seconds=60, transport=handler)
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
