"""The HTTP edge in isolation: the media type read_json_body accepts, and log redaction."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from starlette.requests import Request

from app.errors import UnsupportedMediaType
from app.logging import access_log, configure_logging, redact
from app.metrics import Metrics
from app.middleware import RequestContextMiddleware, read_json_body

KEY = "pgw_9KdbCaNGhv9YA93claWEn1nwm0RVfNnA0AJOK0NiXHo"


def _request(content_type: str | None, body: bytes = b"{}") -> Request:
    headers = [(b"content-length", str(len(body)).encode())]
    if content_type is not None:
        headers.append((b"content-type", content_type.encode()))
    sent = False

    async def receive() -> dict[str, object]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
    return Request(scope, receive)


class TestMediaType:
    @pytest.mark.parametrize(
        "content_type",
        ["application/json", "application/json; charset=utf-8", "Application/JSON ;charset=UTF-8"],
    )
    async def test_json_with_or_without_parameters(self, content_type: str) -> None:
        assert await read_json_body(_request(content_type, b'{"a": 1}'), 100) == {"a": 1}

    @pytest.mark.parametrize(
        "content_type",
        [None, "", "application/jsonx", "application/json-seq", "text/json", "text/plain"],
    )
    async def test_anything_else_is_415(self, content_type: str | None) -> None:
        with pytest.raises(UnsupportedMediaType) as refused:
            await read_json_body(_request(content_type), 100)
        assert refused.value.message == "requests must be of type application/json"


class TestRedact:
    def test_a_key_is_cut_to_its_prefix(self) -> None:
        assert redact(f"key {KEY} used") == "key pgw_9KdbCaNG... used"

    def test_a_prefix_alone_is_left_as_it_is(self) -> None:
        assert redact("key_prefix=pgw_9KdbCaNG") == "key_prefix=pgw_9KdbCaNG"

    @pytest.mark.parametrize("name", ["api_key", "API_KEY", "token", "access_token", "apikey"])
    def test_secret_query_parameters_are_blanked(self, name: str) -> None:
        line = f'"WebSocket /api/v2/connect?x=1&{name}=hunter2&y=2" [accepted]'
        assert redact(line) == f'"WebSocket /api/v2/connect?x=1&{name}=[redacted]&y=2" [accepted]'

    def test_a_percent_encoded_key_is_caught_too(self) -> None:
        encoded = KEY.replace("pgw_", "%70gw%5F")
        line = f'"WebSocket /api/v2/connect?api%5Fkey={encoded}" [accepted]'
        assert KEY[12:] not in redact(line)
        assert redact(line) == '"WebSocket /api/v2/connect?api_key=[redacted]" [accepted]'
        assert KEY[12:] not in redact(f"/x?y={encoded}")

    def test_an_encoded_line_without_a_secret_keeps_its_encoding(self) -> None:
        assert redact("/api/v2/runtimes?q=a%20b") == "/api/v2/runtimes?q=a%20b"

    def test_other_parameters_stay(self) -> None:
        assert redact("/api/v2/runtimes?language=python") == "/api/v2/runtimes?language=python"


@pytest.fixture
def json_logs() -> Iterator[None]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.getLogger("uvicorn.access").disabled
    saved_access = dict(vars(access_log))  # configure_logging sets the access line's path too
    yield
    root.handlers[:], level, logging.getLogger("uvicorn.access").disabled = saved
    vars(access_log).update(saved_access)
    root.setLevel(level)
    logging.captureWarnings(False)
    structlog.reset_defaults()


def test_uvicorns_websocket_line_is_json_with_the_request_id_and_no_key(
    json_logs: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("info")
    structlog.contextvars.bind_contextvars(request_id="rid-1")
    try:
        logging.getLogger("uvicorn.error").info(
            '%s - "WebSocket %s" [accepted]', "127.0.0.1:1", f"/api/v2/connect?api_key={KEY}"
        )
        structlog.get_logger("app.test").info("ours", detail=f"saw {KEY}")
    finally:
        structlog.contextvars.unbind_contextvars("request_id")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [line["request_id"] for line in lines] == ["rid-1", "rid-1"]
    assert lines[0]["logger"] == "uvicorn.error"
    assert (
        lines[0]["event"]
        == '127.0.0.1:1 - "WebSocket /api/v2/connect?api_key=[redacted]" [accepted]'
    )
    assert lines[1]["detail"] == "saw pgw_9KdbCaNG..."
    assert KEY not in json.dumps(lines)


class TestRequestOutcomes:
    """What the access line and pgw_requests_total say of a request nobody was answered."""

    async def _cancelled(self) -> tuple[list[Any], float | None]:
        started = asyncio.Event()

        async def app(scope: object, receive: object, send: object) -> None:
            started.set()
            await asyncio.Event().wait()  # a run that never ends

        metrics = Metrics()
        middleware = RequestContextMiddleware(app, metrics, max_body_bytes=100, body_timeout=5.0)
        scope = {"type": "http", "method": "POST", "path": "/api/v2/execute", "headers": []}

        async def receive() -> dict[str, object]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: object) -> None:
            pass

        with structlog.testing.capture_logs() as logs:
            task = asyncio.ensure_future(middleware(scope, receive, send))
            await started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        counted = metrics.registry.get_sample_value(
            "pgw_requests_total", {"route": "unmatched", "status": "499"}
        )
        return logs, counted

    async def test_a_cancelled_request_is_499_not_500(self) -> None:
        logs, counted = await self._cancelled()
        [line] = [line for line in logs if line["event"] == "request"]
        assert line["status"] == 499
        assert counted == 1.0
