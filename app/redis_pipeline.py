"""A pipelining Redis client for the hot path: one connection, replies matched in order.

Why it exists (bench/redis_floors.py measures it against redis-py, coredis and valkey-glide):
redis-py's asyncio client spends 200-300 µs of CPU per call on a pool, a retry wrapper, a
coroutine chain and its own parsing, more than the whole bare FastAPI request. A call here is a
packed command (hiredis), a future and an entry in a queue:

- every command of every concurrent caller in one loop iteration goes out in one write;
- one `asyncio.Protocol` feeds what arrives to hiredis's reader and hands each reply to the next
  waiting future (Redis answers one connection strictly in order);
- a call on a live connection creates no coroutine: it returns the future itself.

The failure behaviour is redis-py's, so the gateway's outage handling needs no change: a refused
or timed-out connect raises `redis.exceptions.ConnectionError` / `TimeoutError`, an `-ERR` reply
raises `ResponseError` (`NoScriptError`, ...) for that call only, a dropped connection fails every
pending call at once with `ConnectionError`, and a Redis that stops answering (a hung host,
SIGSTOP) fails each call by its own deadline with `TimeoutError` and drops the connection. The
next call after a loss connects again: nothing has to be recreated.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeAlias, cast
from urllib.parse import unquote, urlsplit

import hiredis
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    ConnectionError,
    NoScriptError,
    ReadOnlyError,
    ResponseError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["PipelinedRedis", "Script"]

Arg: TypeAlias = bytes | str | int | float
# A pending call: its future (None: a reply nobody waits for), when it was queued and its deadline
# (loop time), and for EVALSHA the script and its keys/args, so on NOSCRIPT it can run as EVAL.
_Entry: TypeAlias = tuple["asyncio.Future[Any] | None", float, float, "_ScriptCall | None"]
_ScriptCall: TypeAlias = tuple["Script", Sequence[Arg], Sequence[Arg]]

# Error replies as redis-py raises them (its parser's mapping, for the prefixes we can meet).
_ERRORS: Final[dict[str, type[Exception]]] = {
    "NOSCRIPT": NoScriptError,
    "LOADING": BusyLoadingError,
    "READONLY": ReadOnlyError,
}
_AUTH_ERRORS: Final = ("NOAUTH", "WRONGPASS", "NOPERM")
# hiredis's stub types its argument as a one-element tuple; it takes any number.
_pack = cast(Callable[[tuple[Arg | None, ...]], bytes], hiredis.pack_command)


def _error(reply: ResponseError) -> Exception:
    message = str(reply)
    prefix = message.split(" ", 1)[0]
    cls = _ERRORS.get(prefix)
    if cls is not None:
        return cls(message)
    return reply


class Script:
    """A Lua script called by SHA: `await script(keys=[...], args=[...])`, as redis-py's."""

    def __init__(self, client: PipelinedRedis, source: str) -> None:
        self.client = client
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def __call__(
        self,
        keys: Sequence[Arg] = (),
        args: Sequence[Arg] = (),
        *,
        timeout: float | None = None,
    ) -> Awaitable[Any]:
        return self.client.evalsha(self, keys, args, timeout=timeout)


class _Connection(asyncio.Protocol):
    """One connection: a write buffer flushed once per loop iteration, and the pending calls."""

    def __init__(self, client: PipelinedRedis, loop: asyncio.AbstractEventLoop) -> None:
        self._client = client
        self._loop = loop
        self._reader = hiredis.Reader(replyError=ResponseError)
        self._pending: deque[_Entry] = deque()
        self._out: list[bytes] = []
        self._flushing = False
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self.closed = False

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but have its methods.
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc else ""
        self._drop(ConnectionError(f"Connection to Redis lost{reason}"))

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        pending = self._pending
        reader.feed(data)
        while pending:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self._drop(ConnectionError(f"Redis protocol error: {exc}"))
                return
            if reply is False:
                return
            fut, _, _, call = pending.popleft()
            if type(reply) is ResponseError:
                error = _error(reply)
                if call is not None and type(error) is NoScriptError:
                    # A restarted or flushed Redis: run this call again as EVAL, which also
                    # loads the script for the EVALSHAs after it (a compile error, if any, is
                    # then this call's own reply).
                    self._retry_script(fut, call)
                elif fut is not None and not fut.done():
                    fut.set_exception(error)
            elif fut is not None and not fut.done():
                fut.set_result(reply)

    # -- calls ---------------------------------------------------------------------------------

    def send(
        self, packed: bytes, timeout: float, call: _ScriptCall | None = None
    ) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self._loop.create_future()
        self.queue(packed, fut, timeout, call)
        return fut

    def queue(
        self,
        packed: bytes,
        fut: asyncio.Future[Any] | None,
        timeout: float,
        call: _ScriptCall | None = None,
    ) -> None:
        now = self._loop.time()
        deadline = now + timeout
        self._pending.append((fut, now, deadline, call))
        self._out.append(packed)
        if not self._flushing:
            self._flushing = True
            self._loop.call_soon(self._flush)
        if self._timer is None or deadline < self._timer_at:
            self._arm(deadline)

    def _flush(self) -> None:
        self._flushing = False
        out = self._out
        if not out or self.closed or self._transport is None:
            return
        self._out = []
        self._transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _retry_script(self, fut: asyncio.Future[Any] | None, call: _ScriptCall) -> None:
        script, keys, args = call
        packed = _pack(("EVAL", script.source, len(keys), *keys, *args))
        self.queue(packed, fut, self._client.timeout)

    # -- deadlines -----------------------------------------------------------------------------

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._expire)

    def _expire(self) -> None:
        """A deadline passed: fail the calls past theirs; a stuck head means Redis is not answering.

        The timer is left to fire rather than cancelled when the queue empties (a timer per call
        would cost more than the rest of the call), so it fires at most once per deadline."""
        self._timer = None
        if not self._pending:
            return
        now = self._loop.time()
        _, head_queued, head_deadline, _ = self._pending[0]
        stuck_at = max(head_queued + self._client.timeout, head_deadline)
        if stuck_at <= now:
            # The oldest reply is past its own bound and the client's read timeout: nothing
            # queued behind it can arrive first, so the connection is stuck (a hung Redis), not
            # one impatient caller. Fail all, and connect again on the next call.
            self._drop(RedisTimeoutError("Timeout reading from Redis"))
            return
        soonest = stuck_at
        for fut, _, deadline, _ in self._pending:
            if fut is None or fut.done():
                continue
            if deadline <= now:
                # Its reply may still come (and is then dropped), but this caller's bound is up.
                fut.set_exception(RedisTimeoutError("Timeout reading from Redis"))
            elif deadline < soonest:
                soonest = deadline
        self._arm(soonest)

    # -- teardown ------------------------------------------------------------------------------

    def _drop(self, error: Exception) -> None:
        """Fail every pending call with `error` and close: the next call connects again."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.closed = True
        pending, self._pending = self._pending, deque()
        self._out = []
        for fut, _, _, _ in pending:
            if fut is not None and not fut.done():
                fut.set_exception(error)
        if self._transport is not None:
            self._transport.abort()
        self._client._lost(self)

    def close(self) -> None:
        self._drop(ConnectionError("Redis client closed"))


def _consume(task: asyncio.Task[_Connection]) -> None:
    if not task.cancelled():
        task.exception()


class PipelinedRedis:
    """One pipelined connection to Redis per event loop, reconnected on the call after a loss.

    `url`: redis://[[user]:password@]host[:port][/db], rediss://... (TLS, verified against the
    system's CAs or `ssl_ca_certs=<file>`; `ssl_cert_reqs=none` skips verification), or
    unix:///path?db=N. `timeout` bounds each call (connect included) unless the call gives its
    own, and is the connection's read timeout; `connect_timeout` bounds a connect and its
    handshake. On a live connection calls go out in the order they are made; while (re)connecting,
    in the order they are awaited.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 1.0,
        connect_timeout: float = 0.5,
        client_name: str | None = None,
    ) -> None:
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._client_name = client_name
        self._parse(url)
        self._conn: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None
        self._closed = False

    def _parse(self, url: str) -> None:
        parts = urlsplit(url)
        query: dict[str, str] = {}
        for pair in filter(None, parts.query.split("&")):
            name, _, value = pair.partition("=")
            query[name] = unquote(value)
        self._username = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        self._ssl: ssl.SSLContext | None = None
        self._path: str | None = None
        self._host = parts.hostname or "localhost"
        self._port = parts.port or 6379
        if parts.scheme == "unix":
            self._path = unquote(parts.path)
            self._db = int(query.get("db", "0"))
        elif parts.scheme in ("redis", "rediss"):
            path = parts.path.lstrip("/")
            self._db = int(path) if path else int(query.get("db", "0"))
            if parts.scheme == "rediss":
                self._ssl = ssl.create_default_context(cafile=query.get("ssl_ca_certs"))
                if query.get("ssl_cert_reqs", "required") == "none":
                    self._ssl.check_hostname = False
                    self._ssl.verify_mode = ssl.CERT_NONE
        else:
            raise ValueError("Redis URL must be redis://, rediss:// or unix://")

    # -- calls ---------------------------------------------------------------------------------

    def execute(self, *command: Arg, timeout: float | None = None) -> Awaitable[Any]:
        """Send one command; await its reply (bytes, int, list, None) or its error."""
        return self._send(_pack(command), timeout, None)

    def register_script(self, source: str) -> Script:
        return Script(self, source)

    def evalsha(
        self,
        script: Script,
        keys: Sequence[Arg],
        args: Sequence[Arg],
        *,
        timeout: float | None = None,
    ) -> Awaitable[Any]:
        """EVALSHA; on NOSCRIPT the script is loaded and the call run again, transparently."""
        packed = _pack(("EVALSHA", script.sha, len(keys), *keys, *args))
        return self._send(packed, timeout, (script, keys, args))

    def get(self, key: Arg, *, timeout: float | None = None) -> Awaitable[Any]:
        return self.execute("GET", key, timeout=timeout)

    def _send(
        self, packed: bytes, timeout: float | None, call: _ScriptCall | None
    ) -> Awaitable[Any]:
        conn = self._conn
        if conn is not None and not conn.closed:
            # The hot path: no coroutine, just the future the reply will resolve.
            return conn.send(packed, self.timeout if timeout is None else timeout, call)
        return self._send_after_connect(packed, timeout, call)

    async def _send_after_connect(
        self, packed: bytes, call_timeout: float | None, call: _ScriptCall | None
    ) -> Any:
        bound = self.timeout if call_timeout is None else call_timeout
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout(bound):
                conn = await self._connection()
        except TimeoutError:  # the call's own bound ran out while connecting
            raise RedisTimeoutError("Timeout connecting to Redis") from None
        left = max(0.0, bound - (loop.time() - started))
        return await conn.send(packed, left, call)

    async def _connection(self) -> _Connection:
        if self._closed:
            raise ConnectionError("Redis client closed")
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._connect())
            # Retrieved here too: if every caller gave up, nobody else reads its error.
            self._connecting.add_done_callback(_consume)
        # Shielded: one caller giving up must not cancel the connect the others wait for.
        try:
            return await asyncio.shield(self._connecting)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and task is not None and not task.cancelling():
                # aclose() cancelled the connect, not this caller's own task being cancelled.
                raise ConnectionError("Redis client closed") from None
            raise

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        where = self._path or f"{self._host}:{self._port}"
        conn: _Connection | None = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self._path is not None:
                    _, conn = await loop.create_unix_connection(
                        lambda: _Connection(self, loop), self._path
                    )
                else:
                    _, conn = await loop.create_connection(
                        lambda: _Connection(self, loop), self._host, self._port, ssl=self._ssl
                    )
                await self._handshake(conn)
        except TimeoutError:
            if conn is not None:
                conn.close()
            raise RedisTimeoutError(f"Timeout connecting to Redis at {where}") from None
        except OSError as exc:
            raise ConnectionError(f"Error connecting to Redis at {where}: {exc}") from None
        except ResponseError as exc:
            if conn is not None:
                conn.close()
            if str(exc).split(" ", 1)[0] in _AUTH_ERRORS:
                raise AuthenticationError(str(exc)) from None
            raise ConnectionError(f"Redis refused the connection setup: {exc}") from None
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        finally:
            self._connecting = None
        if self._closed:
            conn.close()
            raise ConnectionError("Redis client closed")
        self._conn = conn
        return conn

    async def _handshake(self, conn: _Connection) -> None:
        steps: list[asyncio.Future[Any]] = []
        bound = self.connect_timeout
        if self._password is not None:
            auth = ("AUTH", self._username, self._password) if self._username else None
            packed = _pack(auth or ("AUTH", self._password))
            steps.append(conn.send(packed, bound))
        if self._db:
            steps.append(conn.send(_pack(("SELECT", self._db)), bound))
        if self._client_name:
            name = ("CLIENT", "SETNAME", self._client_name)
            steps.append(conn.send(_pack(name), bound))
        if steps:
            # All written at once; the first failure (in order) is raised.
            for result in await asyncio.gather(*steps, return_exceptions=True):
                if isinstance(result, BaseException):
                    raise result

    def _lost(self, conn: _Connection) -> None:
        if self._conn is conn:
            self._conn = None

    async def aclose(self) -> None:
        """Fail whatever is pending and close the connection; later calls raise."""
        self._closed = True
        connecting = self._connecting
        if connecting is not None:
            connecting.cancel()
            await asyncio.wait([connecting])
        if self._conn is not None:
            self._conn.close()
            self._conn = None
