"""The upstream Pistons: one long-lived httpx client each, health, choice, and fault mapping.

Transport and HTTP failures become the gateway's own errors here, so nothing above this module
ever sees an httpx exception or an upstream's internals.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import structlog

from app.errors import BadGateway, GatewayError, GatewayTimeout, ServiceUnavailable
from app.metrics import Metrics
from app.protocol.resolve import Runtime
from app.upstream.discovery import DnsEntry, Resolver, system_resolver
from app.upstream.transport import LeanTransport

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
    runtimes_body: bytes = b""  # the last runtime list as answered, to parse only a change
    drained: asyncio.Event | None = None  # set when a retired upstream's last request ends
    discovered_from: str | None = None  # the dns+http entry this address came from
    last_error: str | None = None

    def status(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "healthy": self.healthy,
            "in_flight": self.in_flight,
            "runtimes": len(self.runtimes),
            "error": self.last_error,
            **({"discovered_from": self.discovered_from} if self.discovered_from else {}),
        }


class _ProbeFailed(Exception):
    """An upstream answered its health check, but not with a runtime list."""


def _parse_runtimes(body: bytes) -> tuple[Runtime, ...]:
    try:
        data = orjson.loads(body)
        if not isinstance(data, list):
            raise TypeError("not a list")
        return tuple(Runtime.from_json(item) for item in data)
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise _ProbeFailed(f"answered a malformed runtime list ({type(exc).__name__})") from None


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


HEALTH_TIMEOUT_S = 2.0  # the contract: no answer to the health check within 2 s is unhealthy


class PistonPool:
    """Every upstream, its runtimes and health, kept fresh in the background.

    Health: each upstream has its own probe loop, `GET /api/v2/runtimes` every `health_seconds`
    with a 2 s bound, so a refused or hung upstream shows as unhealthy within interval + 2 s and
    a recovered one as healthy within one interval, and one hung upstream never delays another's
    probe. The runtime list is the probe because it is what the gateway needs from an upstream
    (an answer that has no runtimes serves nothing) and it is cheap: about 1 ms and 0.5 KB per
    probe against the engine, parsed only when its bytes change, so it also keeps the catalog
    fresh within a second. Nothing here is on the hot path: an execute reads `healthy` only.

    Discovery: each `dns+http://NAME:PORT` entry is resolved every `discovery_seconds` off the
    event loop; addresses that appear become upstreams, those that go away are retired (their
    in-flight requests finish, then their client is closed); a name that stops resolving keeps
    its last addresses until it resolves again.
    """

    def __init__(
        self,
        urls: Iterable[str],
        *,
        connect_timeout: float,
        health_seconds: float = 1.0,
        discovery_seconds: float = 10.0,
        resolver: Resolver | None = None,
        metrics: Metrics | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._metrics = metrics
        self._connect_timeout = connect_timeout
        self._transport = transport
        self._health_seconds = health_seconds
        self._discovery_seconds = discovery_seconds
        self._resolver: Resolver = resolver or system_resolver
        self._dns: list[DnsEntry] = []
        static: list[str] = []
        for url in urls:
            entry = DnsEntry.parse(url)
            if entry is None:
                static.append(url)
            else:
                self._dns.append(entry)
        # Replaced, never mutated in place: a request iterating the old list is not disturbed.
        self.upstreams: list[Upstream] = [self._upstream(url) for url in static]
        self._discovered: dict[DnsEntry, list[Upstream]] = {entry: [] for entry in self._dns}
        self._unresolved: set[DnsEntry] = set()  # logged once when it fails, once when it is back
        self._probes: dict[Upstream, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._retiring: set[Upstream] = set()
        self._discovery: asyncio.Task[None] | None = None
        self._closed = False
        self.version = 0  # bumped whenever the runtime set or the upstream set changes

    def _upstream(self, url: str) -> Upstream:
        chosen = (
            self._transport
            or LeanTransport.for_url(url)
            or httpx.AsyncHTTPTransport(
                limits=httpx.Limits(max_connections=512, max_keepalive_connections=128)
            )
        )
        client = httpx.AsyncClient(
            base_url=url.rstrip("/"),
            timeout=httpx.Timeout(10.0, connect=self._connect_timeout),
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
        """Resolve every name and probe every upstream once, so readiness is right at boot."""
        await self.discover()
        await self.refresh()
        for upstream in self.upstreams:
            self._watch(upstream)
        if self._dns:
            self._discovery = asyncio.create_task(self._discover_forever(), name="discovery")

    async def close(self) -> None:
        self._closed = True
        tasks = [*self._probes.values(), *self._background]
        if self._discovery is not None:
            tasks.append(self._discovery)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._probes.clear()
        await asyncio.gather(*(u.client.aclose() for u in {*self.upstreams, *self._retiring}))

    # -- health ------------------------------------------------------------------------------

    def _watch(self, upstream: Upstream) -> None:
        if upstream not in self._probes and not self._closed:
            self._probes[upstream] = asyncio.create_task(
                self._probe_forever(upstream), name=f"health {upstream.url}"
            )

    async def _probe_forever(self, upstream: Upstream) -> None:
        while True:
            await asyncio.sleep(self._health_seconds)
            await self._probe(upstream)

    async def refresh(self) -> None:
        """Probe every upstream now."""
        await asyncio.gather(*(self._probe(u) for u in self.upstreams))

    async def _probe(self, upstream: Upstream) -> None:
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                response = await upstream.client.get("/api/v2/runtimes", timeout=HEALTH_TIMEOUT_S)
            if response.status_code != 200:
                raise _ProbeFailed(f"answered its runtime list with status {response.status_code}")
            if response.content != upstream.runtimes_body:
                runtimes = _parse_runtimes(response.content)
                upstream.runtimes_body = response.content
                if runtimes != upstream.runtimes:
                    upstream.runtimes = runtimes
                    self.version += 1
        except (TimeoutError, httpx.TimeoutException):
            self._mark_unhealthy(upstream, f"no answer within {HEALTH_TIMEOUT_S:g} s")
        except httpx.HTTPError as exc:
            self._mark_unhealthy(upstream, type(exc).__name__)
        except _ProbeFailed as exc:
            self._mark_unhealthy(upstream, str(exc))
        else:
            if not upstream.healthy:
                log.info("upstream_healthy", upstream=upstream.url, runtimes=len(upstream.runtimes))
                upstream.healthy = True
                self.version += 1
            upstream.last_error = None

    def _mark_unhealthy(self, upstream: Upstream, error: str) -> None:
        if upstream.healthy:
            log.warning("upstream_unhealthy", upstream=upstream.url, error=error)
            upstream.healthy = False
            self.version += 1
        upstream.last_error = error

    # -- discovery ---------------------------------------------------------------------------

    async def _discover_forever(self) -> None:
        while True:
            await asyncio.sleep(self._discovery_seconds)
            await self.discover()

    async def discover(self) -> None:
        """Resolve every dns+http entry once and bring the upstream set in line with it."""
        # Resolved together, so one slow name does not hold the others back; applied in order.
        answers = await asyncio.gather(*(self._resolve(entry) for entry in self._dns))
        for entry, addresses in zip(self._dns, answers, strict=True):
            if addresses is not None:
                self._apply(entry, [entry.url_for(address) for address in addresses])

    async def _resolve(self, entry: DnsEntry) -> list[str] | None:
        """The name's addresses, or None (logged once per outage) to keep the last ones."""
        try:
            addresses = list(await self._resolver(entry.name, entry.port))
            if not addresses:
                raise OSError("the name resolves to no address")
        except (OSError, UnicodeError) as exc:  # socket.gaierror is an OSError
            if entry not in self._unresolved:
                self._unresolved.add(entry)
                log.warning(
                    "discovery_failed",
                    entry=entry.entry,
                    error=str(exc) or type(exc).__name__,
                    kept=[u.url for u in self._discovered[entry]],
                )
            return None
        if entry in self._unresolved:
            self._unresolved.discard(entry)
            log.info("discovery_recovered", entry=entry.entry, addresses=addresses)
        return addresses

    def _apply(self, entry: DnsEntry, urls: list[str]) -> None:
        current = {u.url: u for u in self._discovered[entry]}
        taken = {u.url for u in self.upstreams} - current.keys()
        wanted = [url for url in dict.fromkeys(urls) if url not in taken]
        added = [self._upstream(url) for url in wanted if url not in current]
        for upstream in added:
            upstream.discovered_from = entry.entry
        removed = [u for url, u in current.items() if url not in wanted]
        if not added and not removed:
            return
        kept = [u for u in self._discovered[entry] if u not in removed]
        self._discovered[entry] = kept + added
        self.upstreams = [u for u in self.upstreams if u not in removed] + added
        self.version += 1
        for upstream in added:
            log.info("upstream_added", entry=entry.entry, upstream=upstream.url)
            self._spawn(self._first_probe(upstream))
        for upstream in removed:
            log.info("upstream_removed", entry=entry.entry, upstream=upstream.url)
            probe = self._probes.pop(upstream, None)
            if probe is not None:
                probe.cancel()
            self._spawn(self._retire(upstream))

    async def _first_probe(self, upstream: Upstream) -> None:
        await self._probe(upstream)  # healthy (or not) at once, not one interval later
        if upstream in self.upstreams:
            self._watch(upstream)

    async def _retire(self, upstream: Upstream) -> None:
        """Close a removed upstream's client once the requests still running on it finish."""
        upstream.healthy = False
        self._retiring.add(upstream)
        if upstream.in_flight > 0:  # each has its own deadline, so this ends
            upstream.drained = asyncio.Event()
            await upstream.drained.wait()
        await upstream.client.aclose()
        self._retiring.discard(upstream)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        if self._closed:
            work.close()
            return
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

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
        """Healthy upstreams that have the runtime (any healthy one if none has), least busy
        first. None healthy is a 503 at once: a request never waits on an upstream known down."""
        healthy = [u for u in self.upstreams if u.healthy]
        if not healthy:
            raise ServiceUnavailable("no upstream Piston is reachable; try again shortly")
        if runtime is not None:
            healthy = [u for u in healthy if runtime in u.runtimes] or healthy
        return sorted(healthy, key=lambda u: u.in_flight)

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
                # Marked down at once (logged once, when it goes down); the probe brings it back.
                self._mark_unhealthy(upstream, type(exc).__name__)
                self._count_error(upstream, "unreachable")
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
                if upstream.drained is not None and upstream.in_flight == 0:
                    upstream.drained.set()
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
