from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.support import LOG_SCAN, RedisServer, Service, start_gateway

E2E_ADMIN_KEY = "pgw_e2e_admin_key_for_two_gateway_processes_0123456789"


@pytest.fixture(autouse=True)
def log_scan() -> Iterator[None]:
    """After every e2e test: each line its processes logged since is JSON and holds no key
    (minted ones, admin ones, and anything shaped like a key, valid or not)."""
    yield
    problems = LOG_SCAN.problems()
    assert not problems, "\n".join(problems[:20])


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The same once every process has stopped, for their shutdown lines too. (A hook, not a
    session fixture: an autouse session fixture here reorders the e2e fixtures' set-up.)"""
    problems = LOG_SCAN.problems()
    if problems:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line("log scan after the session:\n" + "\n".join(problems[:20]))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def replicas(redis_server: RedisServer, engine: Service) -> Iterator[list[Service]]:
    """Two `piston-gateway serve` processes on one (flushed) Redis and the engine."""
    redis.Redis.from_url(redis_server.url).flushall()
    started = [
        start_gateway(redis_url=redis_server.url, piston_url=engine.url, admin_key=E2E_ADMIN_KEY)
        for _ in range(2)
    ]
    yield started
    for service in started:
        service.stop()
