"""The upstream Pistons: one long-lived httpx client each, health, choice, and fault mapping.

Transport and HTTP failures become the gateway's own errors here, so nothing above this module
ever sees an httpx exception or an upstream's internals.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import structlog

from app.errors import BadGateway, GatewayError, GatewayTimeout, ServiceUnavailable
from app.metrics import Metrics
from app.piston.resolve import Runtime
from app.piston.transport import LeanTransport

__all__ = ["PistonPool", "Upstream", "UpstreamAnswer", "stage_times", "upstream_error"]

log = structlog.get_logger(__name__)

_NO_BODY_HEADERS = {"User-Agent": "piston-gateway"}
_JSON_HEADERS = {**_NO_BODY_HEADERS, "Content-Type": "application/json"}


@dataclass(frozen=True, slots=True)
class UpstreamAnswer:
    """An upstream's answer to an execute: the exact bytes, and what the gateway reads from them."""

    status_code: int
    body: bytes
    statuses: tuple[str | None, ...] = ()  # each stage's `status` (RE, SG, TO, OL, EL, XX, None)
    cpu_time_ms: float = 0.0
    wall_time_ms: float = 0.0

    @property
    def cacheable(self) -> bool:
        """Piston's 200 answers, except timeouts and internal errors (they may not recur)."""
        return self.status_code == 200 and not any(s in ("TO", "XX") for s in self.statuses)


@dataclass(eq=False)
class Upstream:
    url: str
    client: httpx.AsyncClient
    transport: httpx.AsyncBaseTransport  # the client's own, called directly for executes
    base: httpx.URL  # parsed once
    healthy: bool = False
    in_flight: int = 0
    runtimes: tuple[Runtime, ...] = ()
    last_error: str | None = None

    def status(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "healthy": self.healthy,
            "in_flight": self.in_flight,
            "runtimes": len(self.runtimes),
            "error": self.last_error,
        }


def stage_times(stage: Mapping[str, Any]) -> tuple[float, float]:
    """A stage's reported `cpu_time` and `wall_time` (ms), 0 where missing or not a number."""
    cpu, wall = stage.get("cpu_time"), stage.get("wall_time")
    return _ms(cpu), _ms(wall)


def _ms(value: object) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _stage_figures(data: dict[str, Any]) -> tuple[tuple[str | None, ...], float, float]:
    statuses: list[str | None] = []
    cpu = wall = 0.0
    for stage_name in ("compile", "run"):
        stage = data.get(stage_name)
        if not isinstance(stage, dict):
            continue
        if stage_name == "run" and stage == data.get("compile"):
            continue  # Piston mirrors a failed compile as `run`: one stage, counted once
        statuses.append(stage.get("status"))
        stage_cpu, stage_wall = stage_times(stage)
        cpu += stage_cpu
        wall += stage_wall
    return tuple(statuses), cpu, wall


def read_execute_answer(status_code: int, body: bytes) -> UpstreamAnswer:
    """Check that a 200 is Piston's shape; anything else is the upstream's fault (502)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadGateway("the upstream answered with something that is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("run"), dict):
        raise BadGateway("the upstream answered without a run stage")
    statuses, cpu, wall = _stage_figures(data)
    return UpstreamAnswer(status_code, body, statuses, cpu, wall)


def upstream_error(status_code: int, body: bytes) -> GatewayError:
    """Map a non-200 upstream answer: 4xx keeps its {"message"}, anything else is a 502."""
    if 400 <= status_code < 500:
        message: object = None
        with contextlib.suppress(orjson.JSONDecodeError):
            data = orjson.loads(body)
            message = data.get("message") if isinstance(data, dict) else None
        if not isinstance(message, str):
            message = f"the upstream refused the request with status {status_code}"
        return GatewayError(message, status_code=status_code)
    return BadGateway(f"the upstream failed with status {status_code}{_upstream_reason(body)}")


def _upstream_reason(body: bytes) -> str:
    """Piston's own words for a 5xx (e.g. a package that failed to install), if it gave any."""
    with contextlib.suppress(orjson.JSONDecodeError):
        data = orjson.loads(body)
        if isinstance(data, dict) and isinstance(data.get("message"), str) and data["message"]:
            return f": {data['message'][:200]}"
    return ""


class PistonPool:
    """Every configured upstream, its runtimes and health, kept fresh in the background."""

    def __init__(
        self,
        urls: Iterable[str],
        *,
        connect_timeout: float,
        refresh_seconds: float,
        metrics: Metrics | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._metrics = metrics
        self.upstreams = [self._upstream(url, connect_timeout, transport) for url in urls]
        self._refresh_seconds = refresh_seconds
        self._refresher: asyncio.Task[None] | None = None
        self.version = 0  # bumped whenever the runtime set changes

    @staticmethod
    def _upstream(
        url: str, connect_timeout: float, transport: httpx.AsyncBaseTransport | None
    ) -> Upstream:
        chosen = (
            transport
            or LeanTransport.for_url(url)
            or httpx.AsyncHTTPTransport(
                limits=httpx.Limits(max_connections=512, max_keepalive_connections=128)
            )
        )
        client = httpx.AsyncClient(
            base_url=url.rstrip("/"),
            timeout=httpx.Timeout(10.0, connect=connect_timeout),
            transport=chosen,
            headers={"User-Agent": "piston-gateway"},
        )
        return Upstream(
            url=url.rstrip("/"), client=client, transport=chosen, base=httpx.URL(url.rstrip("/"))
        )

    def _count_error(self, upstream: Upstream, kind: str) -> None:
        if self._metrics is not None:
            self._metrics.upstream_errors.labels(upstream=upstream.url, kind=kind).inc()

    async def start(self) -> None:
        await self.refresh()
        self._refresher = asyncio.create_task(self._refresh_forever(), name="runtime-refresh")

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        await asyncio.gather(*(u.client.aclose() for u in self.upstreams))

    async def _refresh_forever(self) -> None:
        while True:
            # A sick upstream is checked again sooner, so recovery shows within seconds.
            healthy = all(u.healthy for u in self.upstreams)
            await asyncio.sleep(
                self._refresh_seconds if healthy else min(2.0, self._refresh_seconds)
            )
            await self.refresh()

    async def refresh(self) -> None:
        await asyncio.gather(*(self._refresh_one(u) for u in self.upstreams))

    async def _refresh_one(self, upstream: Upstream) -> None:
        try:
            response = await upstream.client.get("/api/v2/runtimes", timeout=5.0)
            response.raise_for_status()
            data = orjson.loads(response.content)
            runtimes = tuple(Runtime.from_json(item) for item in data)
        except (
            httpx.HTTPError,
            orjson.JSONDecodeError,
            KeyError,
            TypeError,
            AttributeError,
        ) as exc:
            if upstream.healthy:
                log.warning("upstream_unhealthy", upstream=upstream.url, error=type(exc).__name__)
            upstream.healthy = False
            upstream.last_error = type(exc).__name__
            return
        if not upstream.healthy:
            log.info("upstream_healthy", upstream=upstream.url, runtimes=len(runtimes))
        if runtimes != upstream.runtimes:
            upstream.runtimes = runtimes
            self.version += 1
        upstream.healthy = True
        upstream.last_error = None

    @property
    def runtimes(self) -> list[Runtime]:
        """The union of every healthy upstream's runtimes, first upstream first, no repeats."""
        seen: set[tuple[str, str, str | None]] = set()
        merged: list[Runtime] = []
        for upstream in self.upstreams:
            if not upstream.healthy:
                continue
            for rt in upstream.runtimes:
                ident = (rt.language, rt.version, rt.runtime)
                if ident not in seen:
                    seen.add(ident)
                    merged.append(rt)
        return merged

    def candidates(self, runtime: Runtime | None = None) -> list[Upstream]:
        """Healthy upstreams that have the runtime, least busy first; all of them if none is."""
        healthy = [u for u in self.upstreams if u.healthy]
        if runtime is not None:
            healthy = [u for u in healthy if runtime in u.runtimes] or healthy
        pool = healthy or list(self.upstreams)
        return sorted(pool, key=lambda u: u.in_flight)

    async def execute(
        self, body: bytes, *, runtime: Runtime, read_timeout: float
    ) -> UpstreamAnswer:
        """POST an execute to the best upstream; another one only if the job never started."""
        return await self._send(
            "POST", "/api/v2/execute", body, runtime=runtime, read_timeout=read_timeout
        )

    async def forward(
        self, method: str, path: str, body: bytes | None = None, *, read_timeout: float = 30.0
    ) -> tuple[int, bytes]:
        """A non-execute call (runtimes, packages), answered raw."""
        answer = await self._send(method, path, body, runtime=None, read_timeout=read_timeout)
        return answer.status_code, answer.body

    async def _send(
        self,
        method: str,
        path: str,
        body: bytes | None,
        *,
        runtime: Runtime | None,
        read_timeout: float,
    ) -> UpstreamAnswer:
        candidates: Sequence[Upstream] = self.candidates(runtime)
        timeout = httpx.Timeout(read_timeout, connect=candidates[0].client.timeout.connect)
        headers = _JSON_HEADERS if body is not None else _NO_BODY_HEADERS
        for upstream in candidates:
            upstream.in_flight += 1
            try:
                # Built directly from a parsed base URL: the client's build_request re-parses
                # and merges URLs, half the cost of a call through the lean transport.
                request = httpx.Request(
                    method,
                    upstream.base.copy_with(
                        raw_path=upstream.base.raw_path.rstrip(b"/") + path.encode()
                    ),
                    content=body,
                    headers=headers,
                    extensions={"timeout": timeout.as_dict()},
                )
                # Straight to the transport: the client's auth, redirect and cookie layers
                # cost a third of a call (bench/, cProfile) and the gateway uses none of them.
                response = await upstream.transport.handle_async_request(request)
                content = await response.aread()
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                # Refused or never accepted: the job never started, so try the next upstream.
                upstream.healthy = False
                upstream.last_error = type(exc).__name__
                self._count_error(upstream, "unreachable")
                log.warning("upstream_unreachable", upstream=upstream.url)
                continue
            except httpx.TimeoutException:
                self._count_error(upstream, "timeout")
                log.warning("upstream_timeout", upstream=upstream.url, path=path)
                raise GatewayTimeout(
                    "the upstream did not answer within the stage timeouts"
                ) from None
            except httpx.HTTPError as exc:
                self._count_error(upstream, "transport")
                log.warning("upstream_error", upstream=upstream.url, error=type(exc).__name__)
                raise BadGateway("the upstream connection failed mid-answer") from None
            finally:
                upstream.in_flight -= 1
            if runtime is None:
                return UpstreamAnswer(response.status_code, content)
            if response.status_code != 200:
                self._count_error(upstream, f"status_{response.status_code // 100}xx")
                raise upstream_error(response.status_code, content)
            try:
                return read_execute_answer(response.status_code, content)
            except BadGateway:
                self._count_error(upstream, "malformed")
                raise
        raise ServiceUnavailable("no upstream Piston is reachable; try again shortly")
