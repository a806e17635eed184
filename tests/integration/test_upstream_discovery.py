"""dns+http discovery through the gateway, against real engines on loopback addresses.

Each engine listens on one address and the same port, as the pods behind a headless Service do.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence

import httpx
import pytest

from tests.conftest import GatewayFactory
from tests.support import ROOT, cli, free_port

PY = {"language": "python", "version": "*", "files": [{"content": "print('found')"}]}


def _url(address: str, port: int) -> str:
    return f"http://[{address}]:{port}" if ":" in address else f"http://{address}:{port}"


def _start_engines(addresses: Sequence[str], port: int) -> list[subprocess.Popen[bytes]]:
    procs = []
    for address in addresses:
        log = tempfile.NamedTemporaryFile(prefix="pgw-engine-", suffix=".log", delete=False)
        procs.append(
            subprocess.Popen(
                cli("engine", "--host", address, "--port", str(port)),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        )
    deadline = time.monotonic() + 30
    for address, proc in zip(addresses, procs, strict=True):
        while True:
            assert proc.poll() is None, f"the engine on {address} exited"
            try:
                if httpx.get(f"{_url(address, port)}/api/v2/runtimes", timeout=2).is_success:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"the engine on {address} never answered"
            time.sleep(0.1)
    return procs


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)


def _localhost_addresses() -> list[str]:
    infos = socket.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


@pytest.fixture
def localhost_engines() -> Iterator[tuple[list[str], int]]:
    """An engine on every address `localhost` resolves to here (127.0.0.1, and ::1 where the
    hosts file lists it), all on one port."""
    addresses, port = _localhost_addresses(), free_port()
    procs = _start_engines(addresses, port)
    yield addresses, port
    _stop(procs)


@pytest.fixture
def two_loopback_engines() -> Iterator[int]:
    """Engines on 127.0.0.1 and ::1, one port: two real pods of one Service."""
    port = free_port()
    procs = _start_engines(["127.0.0.1", "::1"], port)
    yield port
    _stop(procs)


async def _readyz_urls(gateway_client: httpx.AsyncClient, want: set[str]) -> dict[str, bool]:
    """/readyz's upstreams once they are exactly `want`, each with its health."""
    async with asyncio.timeout(5):
        while True:
            body = (await gateway_client.get("/readyz")).json()
            seen = {u["url"]: u["healthy"] for u in body["upstreams"]}
            if set(seen) == want and all(seen.values()):
                return seen
            await asyncio.sleep(0.05)


async def test_every_address_of_localhost_becomes_an_upstream(
    localhost_engines: tuple[list[str], int], make_gateway: GatewayFactory
) -> None:
    addresses, port = localhost_engines
    gateway = await make_gateway(piston_urls=[f"dns+http://localhost:{port}"])
    want = {_url(address, port) for address in addresses}
    assert set(await _readyz_urls(gateway.client, want)) == want
    response = await gateway.client.get("/readyz")
    assert response.status_code == 200
    key = await gateway.tenant()
    answer = await gateway.execute(key, PY)
    assert answer.status_code == 200, answer.text
    assert answer.json()["run"]["stdout"] == "found\n"


async def test_two_addresses_both_serve_and_one_going_away_is_removed(
    two_loopback_engines: int, make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """localhost resolves to one address on some machines: the records here are scripted (the
    resolver is the only stand-in), the two upstreams are real engines on 127.0.0.1 and ::1."""
    port = two_loopback_engines
    records = ["127.0.0.1", "::1"]

    async def resolver(name: str, port: int) -> list[str]:
        assert name == "piston.default.svc"
        return list(records)

    monkeypatch.setattr("app.upstream.pool.system_resolver", resolver)
    gateway = await make_gateway(
        piston_urls=[f"dns+http://piston.default.svc:{port}"], discovery_seconds=0.1
    )
    both = {f"http://127.0.0.1:{port}", f"http://[::1]:{port}"}
    assert set(await _readyz_urls(gateway.client, both)) == both
    ready = await gateway.client.get("/readyz")
    assert ready.status_code == 200
    assert {u["discovered_from"] for u in ready.json()["upstreams"]} == {
        f"dns+http://piston.default.svc:{port}"
    }

    key = await gateway.tenant()
    answer = await gateway.execute(key, PY, **{"Cache-Control": "no-store"})
    assert answer.status_code == 200, answer.text

    records.remove("127.0.0.1")  # that pod went away: what is left is reached over IPv6
    only_v6 = {f"http://[::1]:{port}"}
    assert set(await _readyz_urls(gateway.client, only_v6)) == only_v6
    answer = await gateway.execute(key, PY, **{"Cache-Control": "no-store"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["run"]["stdout"] == "found\n"
