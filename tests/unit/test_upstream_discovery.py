"""dns+http discovery (an injected resolver): records added and removed, failures keep the last."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence

import httpx
import orjson
import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from app.errors import ServiceUnavailable
from app.protocol.resolve import Runtime
from app.settings import Settings
from app.upstream.discovery import DnsEntry, system_resolver
from app.upstream.pool import PistonPool

RUNTIMES = orjson.dumps([{"language": "python", "version": "3.12.0", "aliases": ["py"]}])
ANSWER = {"language": "python", "version": "3.12.0", "run": {"stdout": "", "status": None}}


class Records:
    """What the name resolves to right now; `None` means it does not resolve."""

    def __init__(self, *addresses: str) -> None:
        self.addresses: list[str] | None = list(addresses)
        self.asked: list[tuple[str, int]] = []

    async def __call__(self, name: str, port: int) -> Sequence[str]:
        self.asked.append((name, port))
        if self.addresses is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.addresses


def _answers(request: httpx.Request) -> httpx.Response:
    if request.url.path.endswith("/runtimes"):
        return httpx.Response(200, content=RUNTIMES)
    return httpx.Response(200, content=orjson.dumps(ANSWER))


def _pool(records: Records, transport: httpx.AsyncBaseTransport | None = None) -> PistonPool:
    return PistonPool(
        ["dns+http://piston.default.svc:2000"],
        connect_timeout=1,
        discovery_seconds=3600,  # rounds are driven by the test through discover()
        resolver=records,
        transport=transport or httpx.MockTransport(_answers),
    )


def _urls(pool: PistonPool) -> list[str]:
    return sorted(u.url for u in pool.upstreams)


async def _until_healthy(pool: PistonPool, count: int) -> None:
    async with asyncio.timeout(5):
        while sum(u.healthy for u in pool.upstreams) < count:  # noqa: ASYNC110  # first probes
            await asyncio.sleep(0.01)


def test_entries_parse_and_ipv6_goes_in_brackets() -> None:
    entry = DnsEntry.parse("dns+http://piston.ns.svc.cluster.local:2000/")
    assert entry is not None
    assert (entry.name, entry.port) == ("piston.ns.svc.cluster.local", 2000)
    assert entry.url_for("10.0.0.7") == "http://10.0.0.7:2000"
    assert entry.url_for("fd00::7") == "http://[fd00::7]:2000"
    assert DnsEntry.parse("http://piston:2000") is None


async def test_every_address_becomes_a_healthy_upstream_and_records_come_and_go() -> None:
    records = Records("10.0.0.1", "fd00::2")
    pool = _pool(records)
    await pool.start()
    try:
        assert records.asked == [("piston.default.svc", 2000)]
        assert _urls(pool) == ["http://10.0.0.1:2000", "http://[fd00::2]:2000"]
        assert all(u.healthy for u in pool.upstreams)  # probed before start() returns

        records.addresses = ["10.0.0.1", "10.0.0.3"]  # a pod replaced
        await pool.discover()
        assert _urls(pool) == ["http://10.0.0.1:2000", "http://10.0.0.3:2000"]
        await _until_healthy(pool, 2)  # the new one is health-checked as any upstream
    finally:
        await pool.close()


async def test_a_name_that_stops_resolving_keeps_its_last_addresses_logged_once() -> None:
    records = Records("10.0.0.1", "10.0.0.2")
    pool = _pool(records)
    await pool.start()
    try:
        records.addresses = None
        with capture_logs() as logs:
            for _ in range(3):
                await pool.discover()
            assert _urls(pool) == ["http://10.0.0.1:2000", "http://10.0.0.2:2000"]
            records.addresses = []  # an empty answer is no answer either
            await pool.discover()
            assert _urls(pool) == ["http://10.0.0.1:2000", "http://10.0.0.2:2000"]
            records.addresses = ["10.0.0.2"]
            await pool.discover()
        assert _urls(pool) == ["http://10.0.0.2:2000"]
        events = [entry["event"] for entry in logs if entry["event"].startswith("discovery")]
        assert events == ["discovery_failed", "discovery_recovered"]
    finally:
        await pool.close()


async def test_a_name_that_never_resolved_is_retried_and_unready_until_then() -> None:
    records = Records()
    records.addresses = None
    pool = _pool(records)
    await pool.start()
    try:
        assert pool.upstreams == []
        with pytest.raises(ServiceUnavailable, match="no upstream Piston is reachable"):
            pool.candidates()
        records.addresses = ["10.0.0.9"]
        await pool.discover()
        await _until_healthy(pool, 1)
        assert _urls(pool) == ["http://10.0.0.9:2000"]
    finally:
        await pool.close()


class _HeldExecutes(httpx.AsyncBaseTransport):
    """Answers runtimes at once and holds each execute until released; records being closed."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.closed = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/execute"):
            self.started.set()
            await self.release.wait()
        return _answers(request)

    async def aclose(self) -> None:
        self.closed += 1


async def test_a_removed_upstream_finishes_its_requests_then_its_client_is_closed() -> None:
    transport = _HeldExecutes()
    records = Records("10.0.0.1")
    pool = _pool(records, transport)
    await pool.start()
    try:
        running = asyncio.create_task(
            pool.execute(b"{}", runtime=Runtime("python", "3.12.0", ("py",)), read_timeout=5)
        )
        await asyncio.wait_for(transport.started.wait(), 5)
        records.addresses = ["10.0.0.2"]
        await pool.discover()
        assert _urls(pool) == ["http://10.0.0.2:2000"]
        for _ in range(20):
            await asyncio.sleep(0)  # let the retiring task run: a wrongly eager close happens here
        assert transport.closed == 0  # the request on the removed upstream still runs
        transport.release.set()
        answer = await asyncio.wait_for(running, 5)
        assert answer.status_code == 200
        async with asyncio.timeout(5):
            while transport.closed == 0:  # noqa: ASYNC110  # closed once drained
                await asyncio.sleep(0.01)
    finally:
        await pool.close()


async def test_the_system_resolver_answers_every_address_the_os_gives() -> None:
    addresses = await system_resolver("localhost", 2000)
    expected = {info[4][0] for info in socket.getaddrinfo("localhost", 2000, 0, socket.SOCK_STREAM)}
    assert set(addresses) == expected
    assert "127.0.0.1" in addresses


def test_settings_take_dns_entries_beside_plain_urls_and_refuse_other_schemes() -> None:
    settings = Settings(
        piston_urls="dns+http://piston.default.svc:2000, http://10.0.0.1:2000",
        discovery_seconds=5,
    )
    assert [str(url).rstrip("/") for url in settings.piston_urls] == [
        "dns+http://piston.default.svc:2000",
        "http://10.0.0.1:2000",
    ]
    assert Settings().discovery_seconds == 10
    for bad in ("dns+https://piston:2000", "dns+http://:2000", "ftp://piston"):
        with pytest.raises(ValidationError, match="piston_urls"):
            Settings(piston_urls=bad)
    with pytest.raises(ValidationError, match="health_check_seconds"):
        Settings(health_check_seconds=10)  # with the 2 s bound, past the contract's 5 s
