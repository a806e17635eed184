"""A lean HTTP/1.1 keep-alive transport for httpx, for the calls to Piston.

Why: httpx's default transport (httpcore over anyio) spent about 1.3 ms of CPU per call to an
instant upstream on our machines, more than the whole rest of a request (bench/, cProfile: some
2,700 Python calls per request). The gateway talks to a handful of known Piston servers over
plain HTTP/1.1 with small bodies, so it needs far less: a pool of asyncio streams per upstream,
the request written in one piece, the answer parsed by httptools (uvicorn's parser, handles
chunked bodies), and httpx's exception classes so the client above behaves as before.

Anything else (https, proxies, HTTP/2) is not for this transport: `for_url` returns None for
such an upstream and the pool keeps httpx's default.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools
import httpx

from app.clock import SYSTEM_CLOCK, Clock

__all__ = ["LeanTransport"]

_MAX_IDLE = 64
_MAX_IDLE_SECONDS = 4.0  # under Node's 5 s keep-alive timeout: Piston closes idle sockets then
_READ_CHUNK = 65_536


@dataclass(eq=False)
class _Answer:
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: list[bytes] = field(default_factory=list)
    headers_done: bool = False
    complete: bool = False

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.headers_done = True

    @property
    def delimited_by_close(self) -> bool:
        """No length and not chunked: the body ends when the server closes (RFC 9112 6.3)."""
        names = {name.lower() for name, _ in self.headers}
        return self.headers_done and not names & {b"content-length", b"transfer-encoding"}

    def reusable(self, http_version: str) -> bool:
        """HTTP/1.1 keeps the connection unless told otherwise (httptools' own
        should_keep_alive() reads False once the message is complete, so decide here)."""
        connection = b",".join(v for n, v in self.headers if n.lower() == b"connection").lower()
        return http_version == "1.1" and b"close" not in connection and not self.delimited_by_close

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


class LeanTransport(httpx.AsyncBaseTransport):
    """Keep-alive HTTP/1.1 to one plain-http host:port."""

    def __init__(
        self, host: str, port: int, *, max_idle: int = _MAX_IDLE, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self._host = host
        self._monotonic = clock.monotonic  # how long a connection has idled (tests move it)
        self._port = port
        # An IPv6 literal goes in brackets in the Host header (RFC 9110 7.2), as in the URL.
        self._host_header = (f"[{host}]" if ":" in host else host).encode() + f":{port}".encode()
        self._closed = False
        self._idle: deque[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = deque()
        self._max_idle = max_idle

    @classmethod
    def for_url(cls, url: str) -> LeanTransport | None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            return None
        return cls(parts.hostname, parts.port or 80)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        payload = self._serialise(request)
        # A request is written at most once: if a connection fails after that, Piston may
        # already be running the job, so the failure is reported, never retried here.
        connection = self._reusable() or await self._connect(timeouts.get("connect"))
        return await self._exchange(*connection, payload, timeouts)

    def _reusable(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """The freshest idle connection the server has not closed, if any.

        Checked before anything is written: the event loop has already fed a server's close
        to the reader, and connections idle longer than a server's usual keep-alive timeout
        (Node's default, Piston's, is 5 s) are not trusted at all.
        """
        now = self._monotonic()
        while self._idle:
            reader, writer, idle_since = self._idle.pop()
            if reader.at_eof() or writer.is_closing() or now - idle_since > _MAX_IDLE_SECONDS:
                writer.close()
                continue
            return reader, writer
        return None

    async def aclose(self) -> None:
        self._closed = True  # an exchange still running closes its connection, never pools it
        while self._idle:
            _, writer, _ = self._idle.pop()
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _connect(
        self, connect_timeout: float | None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            async with asyncio.timeout(connect_timeout):
                return await asyncio.open_connection(self._host, self._port)
        except TimeoutError:
            raise httpx.ConnectTimeout(
                f"connecting to {self._host}:{self._port} timed out"
            ) from None
        except OSError as exc:
            raise httpx.ConnectError(
                f"cannot connect to {self._host}:{self._port}: {exc}"
            ) from None

    def _serialise(self, request: httpx.Request) -> bytes:
        body = request.read()
        target = request.url.raw_path
        lines = [
            request.method.encode() + b" " + target + b" HTTP/1.1",
            b"Host: " + self._host_header,
        ]
        for name, value in request.headers.raw:
            if name.lower() not in (
                b"host",
                b"content-length",
                b"transfer-encoding",
                b"connection",
            ):
                lines.append(name + b": " + value)
        if body or request.method in ("POST", "PUT", "PATCH", "DELETE"):
            lines.append(b"Content-Length: " + str(len(body)).encode())
        return b"\r\n".join(lines) + b"\r\n\r\n" + body

    async def _exchange(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        payload: bytes,
        timeouts: dict[str, float | None],
    ) -> httpx.Response:
        answer = _Answer()
        parser = httptools.HttpResponseParser(answer)
        try:
            writer.write(payload)
            async with asyncio.timeout(timeouts.get("read")):
                while not answer.complete:
                    data = await reader.read(_READ_CHUNK)
                    if not data:
                        if answer.delimited_by_close:
                            answer.complete = True
                            break
                        raise httpx.RemoteProtocolError("the upstream closed the connection")
                    parser.feed_data(data)
        except TimeoutError:
            writer.close()
            raise httpx.ReadTimeout("the upstream did not answer in time") from None
        except (ConnectionError, OSError) as exc:
            writer.close()
            raise httpx.ReadError(f"the upstream connection failed: {exc}") from None
        except httptools.HttpParserError as exc:
            writer.close()
            raise httpx.RemoteProtocolError(f"malformed answer from the upstream: {exc}") from None
        except BaseException:
            writer.close()  # cancelled mid-answer: the connection's state is unknown
            raise
        answer.status = parser.get_status_code()
        if (
            not self._closed
            and answer.reusable(parser.get_http_version())
            and len(self._idle) < self._max_idle
        ):
            self._idle.append((reader, writer, self._monotonic()))
        else:
            writer.close()
        return httpx.Response(answer.status, headers=answer.headers, content=b"".join(answer.body))
