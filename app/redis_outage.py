"""A Redis outage as one state of the process, with a start and an end.

Every Redis user of the process (the key lookup, the gate, the failed-attempt limiter, the admin
store) reports here what it saw: `failed(exc)` when Redis did not answer, `succeeded()` when it
did. The first failure starts the outage (logged once); from then on those users do not wait on
Redis at all (`active`): they answer at once as the contract says (503, or serving verified keys
without limits), and a probe pings Redis a few times a second until it answers, which ends the
outage (logged once). So an outage costs one log line at each end, not one per request, and a
hung Redis costs one timeout, not one per request; recovery comes within a probe interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from typing import Final

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from app.errors import ServiceUnavailable

__all__ = [
    "OUTAGE_ERRORS",
    "REDIS_DEADLINE_S",
    "RedisOutage",
    "RedisUnavailable",
]

log = structlog.get_logger(__name__)

# What counts as "Redis is unreachable" rather than a bug: refused, reset, or not answering.
OUTAGE_ERRORS: Final = (RedisError, OSError, TimeoutError)
# The contract's "not answering within 1 s": one Redis call is bounded by this, whatever the
# client's own timeouts and retries.
REDIS_DEADLINE_S: Final = 1.0
_PROBE_INTERVAL_S: Final = 0.25
_RETRY_AFTER: Final = "2"
# An error answer (Redis is there, a command failed) is logged at most this often.
_ERROR_LOG_INTERVAL_S: Final = 30.0


class RedisUnavailable(ServiceUnavailable):
    """503 with Retry-After: what a request that needed Redis is answered during an outage."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"{what} is unavailable (Redis unreachable); try again shortly",
            headers={"Retry-After": _RETRY_AFTER},
        )


class RedisOutage:
    """Whether this process currently finds Redis unreachable; one per process (and app)."""

    def __init__(self, redis: Redis | None, *, probe_interval_s: float = _PROBE_INTERVAL_S) -> None:
        self._redis = redis
        self._probe_interval_s = probe_interval_s
        self._since: float | None = None  # monotonic time the outage started
        self._probe: asyncio.Task[None] | None = None
        self._closed = False
        self._last_error_log = -_ERROR_LOG_INTERVAL_S

    @property
    def active(self) -> bool:
        return self._since is not None

    def failed(self, exc: BaseException, *, by: str) -> None:
        """Redis did not answer `by`: start the outage (once) and probe until it answers."""
        if isinstance(exc, ResponseError):
            # Redis answered, with an error: not an outage (the others' calls still work),
            # but worth a line, not one per request.
            now = time.monotonic()
            if now - self._last_error_log >= _ERROR_LOG_INTERVAL_S:
                self._last_error_log = now
                log.error("redis_error_answer", error=str(exc)[:200], detected_by=by)
            return
        if self._since is not None or self._closed:
            return
        self._since = time.monotonic()
        log.warning("redis_unavailable", error=type(exc).__name__, detected_by=by)
        if self._redis is not None:
            # A context of its own: the probe outlives the request that saw the outage, and its
            # "redis_recovered" line must not carry that request's id.
            self._probe = asyncio.get_running_loop().create_task(
                self._probe_until_back(), name="redis-outage-probe", context=contextvars.Context()
            )

    def succeeded(self) -> None:
        """Redis answered: end the outage, if there was one (cheap on the hot path)."""
        if self._since is None:
            return
        lasted = time.monotonic() - self._since
        self._since = None
        log.info("redis_recovered", outage_seconds=round(lasted, 2))

    async def _probe_until_back(self) -> None:
        assert self._redis is not None
        while self._since is not None and not self._closed:
            await asyncio.sleep(self._probe_interval_s)
            try:
                async with asyncio.timeout(REDIS_DEADLINE_S):
                    await self._redis.ping()
            except OUTAGE_ERRORS:
                continue
            self.succeeded()

    async def close(self) -> None:
        self._closed = True
        probe, self._probe = self._probe, None
        if probe is not None and not probe.done():
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await probe
