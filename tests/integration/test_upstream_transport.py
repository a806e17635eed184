"""The lean HTTP/1.1 transport against scripted raw-socket servers on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from app.clock import SYSTEM_CLOCK, Clock
from app.upstream.transport import _MAX_IDLE_SECONDS, LeanTransport
from tests.support import MovableClock, free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
Serve = Callable[..., Awaitable[tuple["Server", LeanTransport]]]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


class Server:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[asyncio.Server] = []
    transports: list[LeanTransport] = []

    async def start(handler: Handler, clock: Clock = SYSTEM_CLOCK) -> tuple[Server, LeanTransport]:
        server = Server(handler)
        port = free_port()
        servers.append(await asyncio.start_server(server._serve, "127.0.0.1", port))
        transport = LeanTransport("127.0.0.1", port, clock=clock)
        transports.append(transport)
        return server, transport

    yield start
    for transport in transports:
        await transport.aclose()
    for s in servers:
        s.close()
        await s.wait_closed()


def _request(url: str = "http://127.0.0.1/api/v2/execute", read: float = 5.0) -> httpx.Request:
    return httpx.Request(
        "POST",
        url,
        content=b'{"a": 1}',
        headers={"Content-Type": "application/json"},
        extensions={"timeout": {"connect": 2.0, "read": read}},
    )


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}"


async def test_keeps_the_connection_alive(serve: Serve) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            server.requests.append(await _read_request(reader))
            writer.write(OK)

    server, transport = await serve(handler)
    for _ in range(3):
        response = await transport.handle_async_request(_request())
        assert response.status_code == 200
        assert response.content == b"{}"
    assert server.connections == 1
    assert server.requests[0].startswith(b"POST /api/v2/execute HTTP/1.1\r\n")
    assert b"Content-Length: 8\r\n" in server.requests[0]
    assert server.requests[0].endswith(b'{"a": 1}')


async def test_chunked_answer(serve: Serve) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
        )

    _, transport = await serve(handler)
    response = await transport.handle_async_request(_request())
    assert response.content == b"abcdefg"


async def test_body_delimited_by_close(serve: Serve) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 502 Bad Gateway\r\n\r\nupstream trouble")
        await writer.drain()
        writer.close()

    _, transport = await serve(handler)
    response = await transport.handle_async_request(_request())
    assert (response.status_code, response.content) == (502, b"upstream trouble")


async def test_connection_close_is_honoured(serve: Serve) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()

    server, transport = await serve(handler)
    for _ in range(2):
        assert (await transport.handle_async_request(_request())).status_code == 200
    assert server.connections == 2


async def test_a_stale_kept_alive_connection_is_replaced(serve: Serve) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Answer once, then close the idle connection without a word (a server's idle timeout).
        server.requests.append(await _read_request(reader))
        writer.write(OK)
        await writer.drain()

    server, transport = await serve(handler)
    assert (await transport.handle_async_request(_request())).status_code == 200
    await asyncio.sleep(0.05)
    assert (await transport.handle_async_request(_request())).status_code == 200
    assert len(server.requests) == 2  # the second request was sent once, on a new connection


async def test_garbage_is_a_protocol_error(serve: Serve) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")

    _, transport = await serve(handler)
    with pytest.raises(httpx.RemoteProtocolError):
        await transport.handle_async_request(_request())


async def test_a_hang_is_a_read_timeout(serve: Serve) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await asyncio.sleep(10)

    _, transport = await serve(handler)
    with pytest.raises(httpx.ReadTimeout):
        await transport.handle_async_request(_request(read=0.2))


async def test_refused_is_a_connect_error() -> None:
    transport = LeanTransport("127.0.0.1", free_port())
    with pytest.raises(httpx.ConnectError):
        await transport.handle_async_request(_request())


def test_only_plain_http_urls() -> None:
    assert LeanTransport.for_url("https://piston.example:2000") is None
    assert LeanTransport.for_url("http://piston:2000") is not None


async def test_a_request_the_server_dropped_is_not_sent_again(serve: Serve) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server.requests.append(await _read_request(reader))
        if len(server.requests) == 1:
            writer.write(OK)  # the first answer keeps the connection alive...
            server.requests.append(await _read_request(reader))
        # ...then the second request is read and the connection dropped, as a crash would.

    server, transport = await serve(handler)
    assert (await transport.handle_async_request(_request())).status_code == 200
    with pytest.raises(httpx.TransportError):
        await transport.handle_async_request(_request())
    assert len(server.requests) == 2  # Piston may be running it: never written twice
    assert server.connections == 1


async def test_long_idle_connections_are_not_trusted(serve: Serve) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await _read_request(reader)
            writer.write(OK)

    clock = MovableClock()
    server, transport = await serve(handler, clock)
    await transport.handle_async_request(_request())
    clock.advance(_MAX_IDLE_SECONDS)  # idle as long as may be trusted: reused
    await transport.handle_async_request(_request())
    assert server.connections == 1
    clock.advance(_MAX_IDLE_SECONDS + 0.1)  # idle longer: a server may be closing it now
    await transport.handle_async_request(_request())
    assert server.connections == 2


async def test_an_ipv6_upstream_gets_a_bracketed_host_header() -> None:
    """A discovered pod may be an IPv6 address: `Host: ::1:2000` is not a valid header."""
    heads: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await _read_request(reader))
        writer.write(OK)
        await writer.drain()
        writer.close()

    port = free_port()
    server = await asyncio.start_server(handler, "::1", port)
    transport = LeanTransport.for_url(f"http://[::1]:{port}")
    assert transport is not None
    try:
        response = await transport.handle_async_request(_request(f"http://[::1]:{port}/x"))
        assert response.status_code == 200
        assert f"\r\nHost: [::1]:{port}\r\n".encode() in heads[0]
    finally:
        await transport.aclose()
        server.close()
        await server.wait_closed()


async def test_a_closed_transport_does_not_pool_an_answer_still_in_flight(serve: Serve) -> None:
    """A retired upstream's client is closed while a request may still finish on it: that
    connection is closed, not put back in a pool nobody will close again."""
    release, closed_by_client = asyncio.Event(), asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await release.wait()
        writer.write(OK)  # a keep-alive answer: a live transport would pool this connection
        await writer.drain()
        await reader.read()
        closed_by_client.set()

    server, transport = await serve(handler)
    running = asyncio.create_task(transport.handle_async_request(_request()))
    while server.connections == 0:  # noqa: ASYNC110  # the request is on its way
        await asyncio.sleep(0.01)
    await transport.aclose()
    release.set()
    response = await running
    assert response.status_code == 200
    await asyncio.wait_for(closed_by_client.wait(), 5)
