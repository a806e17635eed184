"""Hostile clients against a real `piston-gateway serve` process, over raw sockets.

Idle sockets, half-sent heads, huge headers, slow and oversized bodies, broken framing and a flood
of connections: each is bounded, answered `{"message"}` where the server can answer, and leaves
the process's descriptors and memory where they were. Short timeouts (1-2 s) keep this quick.
"""

from __future__ import annotations

import json
import os
import select
import socket
import time
from collections.abc import Callable, Iterator

import pytest
from websockets.asyncio.client import connect as ws_connect

from tests.e2e.conftest import E2E_ADMIN_KEY
from tests.support import Service, mint_key, start_gateway

SHORT = {
    "GATEWAY_HEADER_TIMEOUT_SECONDS": "1",
    "GATEWAY_KEEPALIVE_SECONDS": "1",
    "GATEWAY_BODY_TIMEOUT_SECONDS": "2",
    "GATEWAY_MAX_BODY_BYTES": "65536",
}
COUNT = 200  # bounded: enough to see a leak, well under the default descriptor limit


@pytest.fixture(scope="module")
def gateway(engine: Service) -> Iterator[tuple[Service, str]]:
    service = start_gateway(
        redis_url=None, piston_url=engine.url, admin_key=E2E_ADMIN_KEY, env=SHORT
    )
    key = mint_key(service, E2E_ADMIN_KEY, "hostile", rate_limit="1000/minute")
    yield service, key
    service.stop()


def _pid(service: Service) -> int:
    assert service.proc is not None
    return service.proc.pid


def fds(service: Service) -> int:
    return len(os.listdir(f"/proc/{_pid(service)}/fd"))


def rss_kib(service: Service) -> int:
    with open(f"/proc/{_pid(service)}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def connect(service: Service) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", service.port), timeout=10)
    return sock


def read_answer(sock: socket.socket, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 answer with a Content-Length body: (status, headers, body)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"closed before an answer: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """True once the server has closed: recv gives EOF (or a reset), within `timeout`."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


def message_of(body: bytes) -> str:
    parsed = json.loads(body)
    assert set(parsed) == {"message"}, parsed
    assert isinstance(parsed["message"], str)
    assert parsed["message"]
    return str(parsed["message"])


def execute_head(key: str, length: int, content_type: str = "application/json") -> bytes:
    return (
        "POST /api/v2/execute HTTP/1.1\r\nHost: gw\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


class TestIdleConnections:
    def test_sockets_that_send_nothing_are_closed_and_give_their_descriptors_back(
        self, gateway: tuple[Service, str]
    ) -> None:
        service, _ = gateway
        before_fds, before_rss = fds(service), rss_kib(service)
        sockets = [connect(service) for _ in range(COUNT)]
        try:
            # GATEWAY_HEADER_TIMEOUT_SECONDS=1: no head within 1 s, the server hangs up on each
            # (a socket it never accepted would not see EOF) and gives its descriptor back.
            wait_until(lambda: fds(service) <= before_fds + 5, 10, "idle sockets closed")
            assert all(closed_by_server(sock, 5) for sock in sockets)
        finally:
            for sock in sockets:
                sock.close()
        assert rss_kib(service) - before_rss < 10 * 1024

    def test_half_sent_heads_are_closed(self, gateway: tuple[Service, str]) -> None:
        service, _ = gateway
        before_fds = fds(service)
        sockets = [connect(service) for _ in range(COUNT)]
        try:
            for sock in sockets:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Half: ")
            wait_until(lambda: fds(service) <= before_fds + 5, 10, "half heads closed")
            assert all(closed_by_server(sock, 5) for sock in sockets)
        finally:
            for sock in sockets:
                sock.close()

    def test_an_idle_keep_alive_connection_is_closed(self, gateway: tuple[Service, str]) -> None:
        service, _ = gateway
        with connect(service) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
            status, headers, _ = read_answer(sock)
            assert status == 200
            assert headers.get("connection") != "close"  # kept alive, then
            assert closed_by_server(sock, 3)  # GATEWAY_KEEPALIVE_SECONDS=1 (uvicorn's own: 5)


class TestHeaders:
    def test_headers_over_64_kib_are_refused_with_431(self, gateway: tuple[Service, str]) -> None:
        service, _ = gateway
        with connect(service) as sock:
            headers = "".join(f"X-Filler-{i}: {'a' * 1000}\r\n" for i in range(70))
            sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: gw\r\n{headers}\r\n".encode())
            status, _, body = read_answer(sock)
            assert status == 431
            assert "64" in message_of(body) or "65536" in message_of(body)
            assert closed_by_server(sock, 5)

    def test_a_huge_header_is_refused_before_it_is_read_whole(
        self, gateway: tuple[Service, str]
    ) -> None:
        """A 50 MB header is cut off after 64 KiB, not buffered (main took it whole: +30 MB)."""
        service, _ = gateway
        before_rss = rss_kib(service)
        sent = 0
        chunk = b"a" * 65536
        with connect(service) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Huge: ")
            try:
                while sent < 50 * 1024 * 1024:
                    sock.sendall(chunk)
                    sent += len(chunk)
            except OSError:  # the server hung up on us: what we want
                pass
            assert sent < 8 * 1024 * 1024, "the server kept reading the header"
            assert closed_by_server(sock, 5)
        assert rss_kib(service) - before_rss < 10 * 1024

    def test_broken_framing_is_a_json_400(self, gateway: tuple[Service, str]) -> None:
        service, _ = gateway
        with connect(service) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\nContent-Length: nope\r\n\r\n")
            status, headers, body = read_answer(sock)
        assert status == 400
        assert headers["content-type"] == "application/json"
        message_of(body)


class TestBodies:
    def test_a_declared_length_over_the_cap_is_refused_at_once(
        self, gateway: tuple[Service, str]
    ) -> None:
        service, key = gateway
        with connect(service) as sock:
            sock.sendall(execute_head(key, 10_000_000))  # and not one byte of the body
            status, headers, body = read_answer(sock, timeout=5)
            assert status == 413
            assert "65536" in message_of(body)
            assert headers.get("connection") == "close"

    def test_a_chunked_body_over_the_cap_is_cut_off_on_an_admin_route(
        self, gateway: tuple[Service, str]
    ) -> None:
        """Counted as the route reads it (no length given). Admin bodies have their own, tighter
        cap (16 KiB, app/api/admin.py); which cap speaks depends on how the chunks arrive
        together (one read past 64 KiB meets the global cap first), and both are a 413."""
        service, _ = gateway
        with connect(service) as sock:
            sock.sendall(
                (
                    "POST /admin/tenants HTTP/1.1\r\nHost: gw\r\n"
                    f"Authorization: Bearer {E2E_ADMIN_KEY}\r\n"
                    "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                ).encode()
            )
            piece = b"[" + b"1," * 8000
            for _ in range(10):  # 160 KB in all, past both caps
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            status, _, body = read_answer(sock)
        assert status == 413
        assert message_of(body) in {
            f"request body is larger than the limit of {cap} bytes" for cap in (16384, 65536)
        }

    def test_a_slow_body_gets_408_and_is_disconnected(self, gateway: tuple[Service, str]) -> None:
        service, key = gateway
        with connect(service) as sock:
            sock.sendall(execute_head(key, 200))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if select.select([sock], [], [], 0.3)[0]:
                    break  # the server answered
                sock.sendall(b" ")  # one byte every 0.3 s: a minute for the whole body
            status, headers, body = read_answer(sock)
            assert status == 408
            assert "2 s" in message_of(body)
            assert headers.get("connection") == "close"
            assert closed_by_server(sock, 5)

    def test_an_unread_slow_body_is_disconnected(self, gateway: tuple[Service, str]) -> None:
        """No key: the route answers 401 without reading; the trickle still has a deadline."""
        service, _ = gateway
        with connect(service) as sock:
            sock.sendall(
                b"POST /api/v2/execute HTTP/1.1\r\nHost: gw\r\nContent-Length: 500\r\n\r\n"
            )
            status, _, _ = read_answer(sock)
            assert status == 401
            started = time.monotonic()
            closed = False
            while not closed and time.monotonic() - started < 10:
                try:
                    sock.sendall(b" ")
                except OSError:
                    closed = True
                    break
                closed = closed_by_server(sock, 0.3)
            assert time.monotonic() - started >= 1  # it was the deadline, not the 401
            assert closed, "the connection stayed open past the body deadline"

    def test_a_client_that_leaves_mid_body_logs_no_traceback(
        self, gateway: tuple[Service, str]
    ) -> None:
        service, key = gateway
        for _ in range(3):
            with connect(service) as sock:
                sock.sendall(execute_head(key, 1000) + b'{"language": "py')
                time.sleep(0.1)  # the route is reading the body now
        request_lines: list[dict[str, object]] = []

        def logged() -> bool:
            request_lines[:] = [
                line
                for line in map(json.loads, service.log().splitlines())
                if line.get("event") == "request" and line.get("status") == 499
            ]
            return len(request_lines) >= 3

        wait_until(logged, 5, "three requests logged as abandoned (499)")
        text = service.log()
        assert "Traceback" not in text
        assert "ClientDisconnect" not in text


class TestContentType:
    @pytest.mark.parametrize(
        "content_type", ["application/jsonx", "application/json-patch", "text/plain"]
    )
    def test_only_application_json_is_read(
        self, gateway: tuple[Service, str], content_type: str
    ) -> None:
        service, key = gateway
        body = b'{"language": "python", "version": "*", "files": [{"content": "print(1)"}]}'
        with connect(service) as sock:
            sock.sendall(execute_head(key, len(body), content_type) + body)
            status, _, answer = read_answer(sock)
        assert status == 415
        assert message_of(answer) == "requests must be of type application/json"

    def test_parameters_are_allowed(self, gateway: tuple[Service, str]) -> None:
        service, key = gateway
        body = b'{"language": "python", "version": "*", "files": [{"content": "print(1)"}]}'
        with connect(service) as sock:
            sock.sendall(execute_head(key, len(body), "Application/JSON; charset=utf-8") + body)
            status, _, answer = read_answer(sock, timeout=30)
        assert status == 200, answer
        assert json.loads(answer)["run"]["stdout"] == "1\n"


class TestConnectionCap:
    async def test_past_the_cap_new_connections_get_503_and_are_not_held(
        self, engine: Service
    ) -> None:
        cap = 50
        service = start_gateway(
            redis_url=None,
            piston_url=engine.url,
            admin_key=E2E_ADMIN_KEY,
            env={"GATEWAY_MAX_CONNECTIONS": str(cap), "GATEWAY_HEADER_TIMEOUT_SECONDS": "30"},
        )
        key = mint_key(service, E2E_ADMIN_KEY, "capped", rate_limit="1000/minute")
        held: list[socket.socket] = []
        url = service.url.replace("http://", "ws://") + f"/api/v2/connect?api_key={key}"
        try:
            before_fds = fds(service)
            # A WebSocket counts as one of the cap's connections: a program that runs a while.
            websocket = await ws_connect(url, proxy=None)
            await websocket.send(
                json.dumps(
                    {
                        "type": "init",
                        "language": "python",
                        "version": "*",
                        "files": [{"content": "import time; time.sleep(10)"}],
                    }
                )
            )
            assert json.loads(await websocket.recv())["type"] == "runtime"
            held = [connect(service) for _ in range(cap - 1)]
            wait_until(lambda: fds(service) >= before_fds + cap, 5, "the cap's sockets held")
            refused = [connect(service) for _ in range(COUNT)]
            for sock in refused:
                status, _, body = read_answer(sock)
                assert status == 503
                message_of(body)
                assert closed_by_server(sock, 5)
                sock.close()
            wait_until(lambda: fds(service) <= before_fds + cap + 5, 5, "refused ones released")
            # One of the held ones leaves: a new connection is served again.
            held.pop().close()

            def served() -> bool:
                with connect(service) as sock:
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
                    return read_answer(sock)[0] == 200

            wait_until(served, 5, "a new connection served once one left")
            await websocket.close()
        finally:
            for sock in held:
                sock.close()
            service.stop()


class TestPipelining:
    def test_pipelined_requests_are_answered_whole_and_in_order(
        self, gateway: tuple[Service, str]
    ) -> None:
        # Answers are written once per loop iteration (app.server._CoalescingTransport): the
        # answers to requests sent back to back on one connection must still come whole and in
        # the order asked, a refused one among them.
        service, key = gateway
        body = b'{"language": "python", "version": "*", "files": [{"content": "print(5)"}]}'
        ids = [f"pipe-{n}" for n in range(6)]
        requests = b""
        for n, request_id in enumerate(ids):
            auth = f"Authorization: Bearer {key}\r\n" if n != 3 else ""
            requests += (
                f"POST /api/v2/execute HTTP/1.1\r\nHost: gw\r\nX-Request-ID: {request_id}\r\n"
                f"{auth}Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body
        with connect(service) as sock:
            sock.sendall(requests)
            sock.settimeout(30)
            data = b""
            answers: list[tuple[str, int, bytes]] = []
            while len(answers) < len(ids):
                head_end = data.find(b"\r\n\r\n")
                if head_end >= 0:
                    head = data[:head_end].decode("latin-1").split("\r\n")
                    headers = {
                        name.strip().lower(): value.strip()
                        for name, _, value in (line.partition(":") for line in head[1:])
                    }
                    end = head_end + 4 + int(headers["content-length"])
                    if len(data) >= end:
                        status = int(head[0].split()[1])
                        answers.append((headers["x-request-id"], status, data[head_end + 4 : end]))
                        data = data[end:]
                        continue
                chunk = sock.recv(65536)
                assert chunk, f"closed after {len(answers)} answers"
                data += chunk
        assert [(request_id, status) for request_id, status, _ in answers] == [
            (request_id, 401 if n == 3 else 200) for n, request_id in enumerate(ids)
        ]
        assert all(json.loads(answer) for _, _, answer in answers)
