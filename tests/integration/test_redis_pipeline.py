"""app.redis_pipeline against real redis-servers: order, scripts, errors, outages, recovery.

The outage tests start a redis-server of their own on a free port, so they can SIGSTOP and
SIGKILL it without touching the suite's shared one.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis
import redis.exceptions as rex

from app.errors import ServiceUnavailable, TooManyRequests
from app.limits.redis_gate import RedisGate
from app.redis_pipeline import PipelinedRedis
from app.tenancy.models import Tenant
from tests.support import RedisServer, free_port, wait_for_port

# A test's own guard: far beyond any bound under test, so a hang fails the test, not the suite.
GUARD_S = 10


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    if server.proc is not None:
        os.kill(server.proc.pid, signal.SIGCONT)  # a stopped server cannot act on SIGTERM
    server.stop()


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[PipelinedRedis]:
    c = PipelinedRedis(redis_server.url, client_name="pgw-test-pipeline")
    yield c
    await c.aclose()


def sync(server: RedisServer, db: int = 0) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port, db=db)


async def test_200_concurrent_callers_each_get_their_own_reply(
    client: PipelinedRedis, redis_server: RedisServer
) -> None:
    prefix = "pgw-test:pipeline:order:"
    await asyncio.gather(*(client.execute("SET", f"{prefix}{i}", f"value-{i}") for i in range(200)))

    async def caller(i: int) -> tuple[object, object, object]:
        echo = client.execute("ECHO", f"echo-{i}")
        get = client.execute("GET", f"{prefix}{i}")
        incr = client.execute("INCRBY", f"{prefix}n", i)
        return await echo, await get, await incr

    replies = await asyncio.gather(*(caller(i) for i in range(200)))
    for i, (echo, get, incr) in enumerate(replies):
        assert echo == f"echo-{i}".encode()
        assert get == f"value-{i}".encode()
        assert isinstance(incr, int)
    assert sync(redis_server).get(f"{prefix}n") == str(sum(range(200))).encode()
    # Every INCRBY's reply is the running total at its turn: all different.
    assert len({incr for _, _, incr in replies}) == 200


async def test_script_runs_after_noscript_by_loading_it(
    client: PipelinedRedis, redis_server: RedisServer
) -> None:
    script = client.register_script("return {KEYS[1], ARGV[1], 7}")
    sync(redis_server).script_flush()
    # A Redis that never saw the script: the first calls, concurrent, all hit NOSCRIPT.
    replies = await asyncio.gather(*(script(keys=[f"k{i}"], args=[i]) for i in range(20)))
    assert replies == [[f"k{i}".encode(), str(i).encode(), 7] for i in range(20)]
    assert sync(redis_server).script_exists(script.sha) == [True]
    sync(redis_server).script_flush()  # a restarted or flushed Redis, once more
    assert await script(keys=["again"], args=["x"]) == [b"again", b"x", 7]


async def test_an_error_reply_fails_only_its_own_call(client: PipelinedRedis) -> None:
    await client.execute("SET", "pgw-test:pipeline:str", "x")
    failing = client.register_script("return redis.call('NOPE')")
    broken = client.register_script("return (")
    replies = await asyncio.gather(
        client.execute("ECHO", "before"),
        client.execute("NOSUCHCOMMAND", "x"),
        client.execute("LPUSH", "pgw-test:pipeline:str", "y"),
        failing(),
        broken(),
        client.execute("ECHO", "after"),
        return_exceptions=True,
    )
    assert replies[0] == b"before"
    assert isinstance(replies[1], rex.ResponseError)
    assert "unknown command" in str(replies[1])
    assert isinstance(replies[2], rex.ResponseError)
    assert str(replies[2]).startswith("WRONGTYPE")
    assert isinstance(replies[3], rex.ResponseError)
    assert not isinstance(replies[3], rex.NoScriptError)
    # A script that does not compile: its own error, not a NOSCRIPT from the fallback.
    assert isinstance(replies[4], rex.ResponseError)
    assert not isinstance(replies[4], rex.NoScriptError)
    assert "compiling" in str(replies[4])
    assert replies[5] == b"after"


async def test_auth_and_db_come_from_the_url(own_redis: RedisServer) -> None:
    sync(own_redis).config_set("requirepass", "s3cret")
    good = PipelinedRedis(f"redis://:s3cret@127.0.0.1:{own_redis.port}/2")
    try:
        assert await good.execute("SET", "pgw-test:pipeline:db", "two") == b"OK"
    finally:
        await good.aclose()
    assert (
        redis.Redis(port=own_redis.port, password="s3cret", db=2).get("pgw-test:pipeline:db")
        == b"two"
    )
    bad = PipelinedRedis(f"redis://:wrong@127.0.0.1:{own_redis.port}/0")
    try:
        with pytest.raises(rex.AuthenticationError):
            await bad.execute("PING")
    finally:
        await bad.aclose()
    anonymous = PipelinedRedis(f"redis://127.0.0.1:{own_redis.port}/0")
    try:
        with pytest.raises(rex.ResponseError, match="NOAUTH"):
            await anonymous.execute("PING")
    finally:
        await anonymous.aclose()


async def test_killed_redis_fails_pending_calls_then_the_same_client_recovers(
    own_redis: RedisServer,
) -> None:
    # A call bound far above the guard: only the connection loss can end these calls in time.
    c = PipelinedRedis(own_redis.url, timeout=60)
    try:
        assert await c.execute("PING") == b"PONG"
        assert own_redis.proc is not None
        os.kill(own_redis.proc.pid, signal.SIGSTOP)
        calls = [asyncio.ensure_future(c.execute("ECHO", i)) for i in range(50)]
        await asyncio.sleep(0)  # queued and written to a Redis that cannot answer
        assert not any(call.done() for call in calls)
        os.kill(own_redis.proc.pid, signal.SIGKILL)
        own_redis.proc.wait()
        own_redis.proc = None
        async with asyncio.timeout(GUARD_S):
            results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, rex.ConnectionError) for r in results), results
        # Down: a call fails at once with ConnectionError, it does not hang.
        async with asyncio.timeout(GUARD_S):
            with pytest.raises(rex.ConnectionError):
                await c.execute("PING")
        own_redis.start()  # the same port
        async with asyncio.timeout(GUARD_S):
            replies = await asyncio.gather(*(c.execute("ECHO", i) for i in range(50)))
        assert replies == [str(i).encode() for i in range(50)]
    finally:
        await c.aclose()


async def test_hung_redis_fails_calls_by_their_bound_then_recovers(
    own_redis: RedisServer,
) -> None:
    c = PipelinedRedis(own_redis.url, timeout=0.3)
    script = c.register_script("return ARGV[1]")
    try:
        assert await script(args=["up"]) == b"up"
        assert own_redis.proc is not None
        os.kill(own_redis.proc.pid, signal.SIGSTOP)
        async with asyncio.timeout(GUARD_S):
            results = await asyncio.gather(
                *(script(args=[i]) for i in range(20)),
                c.execute("PING", timeout=0.1),
                return_exceptions=True,
            )
        assert all(isinstance(r, rex.TimeoutError) for r in results), results
        # A client that connects while Redis hangs (its handshake selects a db) fails in time too.
        fresh = PipelinedRedis(own_redis.url.removesuffix("/0") + "/1", timeout=0.3)
        try:
            async with asyncio.timeout(GUARD_S):
                with pytest.raises(rex.TimeoutError):
                    await fresh.execute("PING")
        finally:
            await fresh.aclose()
        os.kill(own_redis.proc.pid, signal.SIGCONT)
        async with asyncio.timeout(GUARD_S):
            assert await script(args=["back"]) == b"back"
    finally:
        await c.aclose()


async def test_a_short_call_bound_does_not_drop_the_connection_for_others(
    client: PipelinedRedis,
) -> None:
    slow = client.register_script(
        "local t = redis.call('TIME') local start = t[1] * 1000000 + t[2] "
        "repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] - start > 300000 "
        "return 1"
    )
    assert await slow() == 1  # connected and the script loaded: what follows is queued at once
    # An impatient caller at the head (its reply is still being computed) and one behind it.
    busy = slow(timeout=0.05)
    ping = client.execute("PING")
    impatient = client.execute("ECHO", "late", timeout=0.05)
    patient = client.execute("ECHO", "in time")
    with pytest.raises(rex.TimeoutError):
        await busy
    with pytest.raises(rex.TimeoutError):
        await impatient
    # Redis was answering all along: the connection stays, and the others get their replies.
    assert await ping == b"PONG"
    assert await patient == b"in time"


async def test_close_fails_pending_and_later_calls(own_redis: RedisServer) -> None:
    c = PipelinedRedis(own_redis.url)
    assert await c.execute("PING") == b"PONG"
    assert own_redis.proc is not None
    os.kill(own_redis.proc.pid, signal.SIGSTOP)
    pending = asyncio.ensure_future(c.execute("PING"))
    await asyncio.sleep(0)
    await c.aclose()
    with pytest.raises(rex.ConnectionError):
        await pending
    with pytest.raises(rex.ConnectionError):
        await c.execute("PING")


def _redis_process(*args: str) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    assert binary is not None
    argv = [binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *args]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A redis-server speaking TLS only, with a self-signed certificate for 127.0.0.1."""
    cert, key = tmp_path / "redis.crt", tmp_path / "redis.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    port = free_port()
    proc = _redis_process(
        *("--port", "0", "--tls-port", str(port), "--dir", str(tmp_path)),
        *("--tls-cert-file", str(cert), "--tls-key-file", str(key)),
        *("--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"),
    )
    try:
        wait_for_port(port, proc=proc)
        yield port, cert
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_rediss_verifies_the_server_certificate(tls_redis: tuple[int, Path]) -> None:
    port, cert = tls_redis
    trusted = PipelinedRedis(f"rediss://127.0.0.1:{port}/1?ssl_ca_certs={cert}")
    try:
        assert await trusted.execute("SET", "pgw-test:pipeline:tls", "yes") == b"OK"
        assert await trusted.execute("GET", "pgw-test:pipeline:tls") == b"yes"
    finally:
        await trusted.aclose()
    # A certificate nobody vouches for is refused, as a connection error.
    untrusted = PipelinedRedis(f"rediss://127.0.0.1:{port}/0")
    try:
        with pytest.raises(rex.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusted.execute("PING")
    finally:
        await untrusted.aclose()
    unverified = PipelinedRedis(f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=none")
    try:
        assert await unverified.execute("PING") == b"PONG"
    finally:
        await unverified.aclose()


@pytest.fixture
def unix_redis(tmp_path: Path) -> Iterator[Path]:
    """A redis-server on a unix socket only."""
    path = tmp_path / "redis.sock"
    proc = _redis_process("--port", "0", "--unixsocket", str(path), "--dir", str(tmp_path))
    try:
        deadline = time.monotonic() + GUARD_S
        while not path.exists():  # the socket file appears once Redis listens
            assert proc.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "redis-server did not listen"
            time.sleep(0.02)
        yield path
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_unix_socket_with_a_db(unix_redis: Path) -> None:
    c = PipelinedRedis(f"unix://{unix_redis}?db=3")
    try:
        assert await c.execute("SET", "pgw-test:pipeline:unix", "three") == b"OK"
        info = (await c.execute("CLIENT", "INFO")).decode()
        assert " db=3 " in info
    finally:
        await c.aclose()


async def test_the_gate_runs_on_it_unchanged_and_an_outage_is_a_503(own_redis: RedisServer) -> None:
    """RedisGate's admit/finish, given this client instead of redis-py's, with no code change."""
    c = PipelinedRedis(own_redis.url, timeout=0.5)
    gate = RedisGate(cast(Any, c), default_rate_limit="2/minute", deadline_s=1.0)
    tenant = Tenant(id="acme", max_concurrency=1, daily_quota=10)
    try:
        first = await gate.admit(tenant, cache_key=None)
        assert first.lease is not None
        assert first.headers["X-RateLimit-Remaining"] == "1"
        with pytest.raises(TooManyRequests) as busy:  # the one slot is held
            await gate.admit(tenant, cache_key=None)
        assert "concurrency" in busy.value.message
        await gate.finish(first, error=False, cpu_time_ms=5, wall_time_ms=9)
        second = await gate.admit(tenant, cache_key=None)  # the slot is back
        await gate.finish(second, error=False, cpu_time_ms=5, wall_time_ms=9)
        with pytest.raises(TooManyRequests) as limited:  # 2 admitted; the refused one took nothing
            await gate.admit(tenant, cache_key=None)
        assert limited.value.headers["Retry-After"]
        usage = sync(own_redis).hgetall(f"pgw:usage:acme:{first.day}")
        assert usage[b"executions"] == b"2"
        assert float(usage[b"cpu_time_ms"]) == 10
        # A cache hit: the stored answer comes back with the admission (no lease taken).
        sync(own_redis).set("pgw-test:pipeline:cache", b'{"run":{}}')
        roomy = Tenant(id="roomy", max_concurrency=1)
        hit = await gate.admit(roomy, cache_key="pgw-test:pipeline:cache")
        assert hit.cached == b'{"run":{}}'
        assert hit.lease is None

        assert own_redis.proc is not None
        own_redis.proc.kill()
        own_redis.proc.wait()
        own_redis.proc = None
        async with asyncio.timeout(GUARD_S):
            with pytest.raises(ServiceUnavailable, match="Redis unreachable"):
                await gate.admit(tenant, cache_key=None)
    finally:
        await c.aclose()


async def test_the_gateways_admit_goes_over_the_pipelined_connection(
    make_gateway: Any, redis_server: RedisServer
) -> None:
    """An execute's admit and finish run on the hot path's own connection, named for CLIENT
    LIST; a cache hit's one call goes there too."""
    gateway = await make_gateway()
    key = await gateway.tenant()
    body = {"language": "python", "version": "*", "files": [{"content": "print(1)"}]}
    assert (await gateway.execute(key, body)).status_code == 200
    inspector = redis.Redis.from_url(redis_server.url)
    try:
        hot = [c for c in inspector.client_list() if c.get("name") == "pgw-gateway-hot"]
        assert len(hot) == 1, inspector.client_list()
        hit = await gateway.execute(key, body)
        assert hit.headers["X-Cache"] == "HIT"
        (after,) = [c for c in inspector.client_list() if c.get("name") == "pgw-gateway-hot"]
        assert after["id"] == hot[0]["id"]  # the same connection, kept
        assert after["cmd"] == "evalsha"  # the hit's one call, the admit script, went there
    finally:
        inspector.close()
