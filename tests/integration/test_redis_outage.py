"""The outage state on a real redis-server: it starts once, ends once Redis answers, and its lines
belong to no request."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, MutableMapping
from typing import Any

import pytest
import structlog
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from app.redis_outage import RedisOutage
from tests.support import RedisServer


@pytest.fixture
def captured() -> Iterator[list[MutableMapping[str, Any]]]:
    lines: list[MutableMapping[str, Any]] = []

    def keep(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        lines.append(event)
        raise structlog.DropEvent

    structlog.configure(processors=[structlog.contextvars.merge_contextvars, keep])
    yield lines
    structlog.reset_defaults()


async def test_the_recovery_line_carries_no_request_id(
    captured: list[MutableMapping[str, Any]],
) -> None:
    server = RedisServer()
    server.start()
    client = Redis.from_url(server.url, socket_connect_timeout=0.5, socket_timeout=0.5)
    outage = RedisOutage(client, probe_interval_s=0.05)
    try:
        server.stop()
        structlog.contextvars.bind_contextvars(request_id="rid-that-saw-it")
        try:
            outage.failed(RedisConnectionError("refused"), by="test")
            outage.failed(RedisConnectionError("refused"), by="test")  # logged once, not twice
        finally:
            structlog.contextvars.unbind_contextvars("request_id")
        assert outage.active
        server.start()  # the same port: the probe finds it
        deadline = time.monotonic() + 5
        # RedisOutage offers no event to wait on: its state, polled up to a deadline.
        while outage.active and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        assert not outage.active, "the outage never ended"
    finally:
        await outage.close()
        await client.aclose()
        server.stop()
    events = [(line["event"], line.get("request_id")) for line in captured]
    assert events == [
        ("redis_unavailable", "rid-that-saw-it"),
        ("redis_recovered", None),
    ]
