from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import RedisServer, Service, start_engine


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """The suite's own redis-server on a free port (never the machine's 6379)."""
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def engine() -> Iterator[Service]:
    """The embedded engine as a real process: every execution in the suite runs real code."""
    service = start_engine()
    yield service
    service.stop()
