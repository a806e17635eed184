"""`piston-gateway bootstrap`: install the runtimes the gateway's clients need on every upstream.

It waits until every upstream answers `/api/v2/runtimes`, installs each requested runtime an
upstream does not list yet through that upstream's `POST /api/v2/packages`, then checks that the
upstream lists it. One line per upstream and runtime; success only when every runtime is on every
upstream. Running it again installs nothing that is already there, and two runs racing on the same
upstream both end well (Piston answers "already installed" to the second, and the listing decides).

It is a one-shot command, not part of the server: it talks to Piston directly (the upstreams in
GATEWAY_PISTON_URLS), not through the gateway, so it needs no key and no Redis.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

__all__ = [
    "Runtime",
    "bootstrap",
    "expand_upstreams",
    "parse_runtimes",
]

# A package install downloads and unpacks a few hundred MB: minutes on a real Piston. Piston holds
# the request open until it is done, so the read timeout is long; it only guards a hung upstream.
INSTALL_TIMEOUT_SECONDS = 1800.0
PROGRESS_EVERY_SECONDS = 10.0
_POLL_SECONDS = 0.5
_CHECK_TIMEOUT = httpx.Timeout(5.0, connect=2.0)

Echo = Callable[[str], None]
Resolver = Callable[[str, int], list[str]]


@dataclass(frozen=True)
class Runtime:
    language: str
    version: str

    def __str__(self) -> str:
        return f"{self.language}-{self.version}"


def parse_runtimes(text: str) -> list[Runtime]:
    """`python=3.10.0,scala=3.0.0` → runtimes; ValueError naming the bad entry otherwise."""
    runtimes: list[Runtime] = []
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        language, sep, version = (part.strip() for part in entry.partition("="))
        if not sep or not language or not version or "=" in version:
            raise ValueError(
                f"{entry!r} is not LANGUAGE=VERSION (expected e.g. python=3.10.0,scala=3.0.0)"
            )
        runtime = Runtime(language.lower(), version)
        if runtime not in runtimes:
            runtimes.append(runtime)
    if not runtimes:
        raise ValueError("no runtimes given (expected e.g. python=3.10.0,scala=3.0.0)")
    return runtimes


def _resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def expand_upstreams(urls: Iterable[str], resolve: Resolver = _resolve) -> list[str]:
    """Plain URLs as they are; each `dns+http://NAME:PORT` as one URL per address NAME resolves
    to (a Kubernetes headless Service: one per Piston pod). A name that does not resolve raises
    OSError (the caller retries until its deadline)."""
    expanded: list[str] = []
    for url in urls:
        url = url.rstrip("/")
        if not url.startswith("dns+"):
            expanded.append(url)
            continue
        parts = urlsplit(url[len("dns+") :])
        port = parts.port or (443 if parts.scheme == "https" else 80)
        for address in resolve(parts.hostname or "", port):
            host = f"[{address}]" if ":" in address else address
            expanded.append(urlunsplit((parts.scheme, f"{host}:{port}", parts.path, "", "")))
    return list(dict.fromkeys(expanded))


def _listed(runtimes: Any, wanted: Runtime) -> bool:
    if not isinstance(runtimes, list):
        return False
    for entry in runtimes:
        if not isinstance(entry, dict) or entry.get("version") != wanted.version:
            continue
        names = [entry.get("language"), *(entry.get("aliases") or [])]
        if wanted.language in names:
            return True
    return False


def _message(response: httpx.Response) -> str:
    """Piston's own words: its `{"message"}`, else the body, else the status."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])
    text = response.text.strip()
    return text[:200] if text else f"HTTP {response.status_code}"


def _describe(exc: Exception) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, httpx.ConnectError):
        return "connection refused or unreachable"
    if isinstance(exc, OSError):
        return f"does not resolve ({exc.strerror or exc})"
    return str(exc) or type(exc).__name__


async def _runtimes(client: httpx.AsyncClient, url: str) -> list[Any]:
    response = await client.get(f"{url}/api/v2/runtimes", timeout=_CHECK_TIMEOUT)
    if response.status_code != 200:
        raise httpx.HTTPStatusError(
            f"answered {response.status_code}: {_message(response)}",
            request=response.request,
            response=response,
        )
    body = response.json()
    if not isinstance(body, list):
        raise ValueError("answered something that is not a list of runtimes")
    return body


class _Waiter:
    """Wait for upstreams, printing how long it has been at most every PROGRESS_EVERY_SECONDS."""

    def __init__(self, echo: Echo, wait: float, progress_every: float) -> None:
        self.echo = echo
        self.wait = wait
        self.progress_every = progress_every
        self.started = time.monotonic()
        self.deadline = self.started + wait

    async def upstreams(
        self, client: httpx.AsyncClient, urls: Sequence[str], resolve: Resolver
    ) -> tuple[list[str], dict[str, str]]:
        """(the upstreams that answered, {upstream: why not} for those that did not in time)."""
        next_note = self.started + self.progress_every
        while True:
            upstreams: list[str] = []
            errors: dict[str, str] = {}
            for url in urls:  # each entry on its own: one name not resolving holds back no other
                try:
                    upstreams += await asyncio.to_thread(expand_upstreams, [url], resolve)
                except OSError as exc:
                    errors[url.rstrip("/")] = _describe(exc)
            # One address named twice (a URL and a dns+http name, say) is one upstream.
            upstreams = list(dict.fromkeys(upstreams))
            errors |= await self._probe(client, upstreams)
            if not errors:
                return upstreams, {}
            now = time.monotonic()
            if now >= self.deadline:
                return [u for u in upstreams if u not in errors], errors
            if now >= next_note:
                why = "; ".join(f"{u}: {e}" for u, e in errors.items())
                self.echo(f"waiting for upstreams ({now - self.started:.0f} s): {why}")
                next_note = now + self.progress_every
            await asyncio.sleep(min(_POLL_SECONDS, max(self.deadline - now, 0.0)))

    @staticmethod
    async def _probe(client: httpx.AsyncClient, upstreams: Sequence[str]) -> dict[str, str]:
        async def one(url: str) -> str | None:
            try:
                await _runtimes(client, url)
            except (httpx.HTTPError, ValueError) as exc:
                return _describe(exc)
            return None

        results = await asyncio.gather(*(one(url) for url in upstreams))
        return {url: error for url, error in zip(upstreams, results, strict=True) if error}


async def _install(
    client: httpx.AsyncClient, url: str, runtime: Runtime, echo: Echo, progress_every: float
) -> tuple[bool, str]:
    """(on the upstream now, the line's verdict) for one runtime on one upstream."""
    try:
        if _listed(await _runtimes(client, url), runtime):
            return True, "already installed"
    except (httpx.HTTPError, ValueError) as exc:
        return False, f"failed: could not list runtimes: {_describe(exc)}"

    echo(f"{url} {runtime}: installing (this can take minutes)")
    started = time.monotonic()
    request = client.post(
        f"{url}/api/v2/packages",
        json={"language": runtime.language, "version": runtime.version},
        timeout=httpx.Timeout(INSTALL_TIMEOUT_SECONDS, connect=5.0),
    )
    task = asyncio.ensure_future(request)
    while True:
        done, _ = await asyncio.wait({task}, timeout=progress_every)
        if done:
            break
        echo(f"{url} {runtime}: still installing ({time.monotonic() - started:.0f} s)")
    try:
        response = task.result()
    except httpx.HTTPError as exc:
        return False, f"failed: {_describe(exc)}"

    try:
        listed = _listed(await _runtimes(client, url), runtime)
    except (httpx.HTTPError, ValueError) as exc:
        return False, f"failed: could not list runtimes after the install: {_describe(exc)}"
    if response.is_success:
        if listed:
            return True, "installed"
        return False, f"failed: Piston answered {response.status_code} but does not list it"
    if listed:  # another bootstrap installed it meanwhile ("... is already installed")
        return True, "already installed"
    return False, f"failed: {_message(response)}"


async def bootstrap(
    urls: Sequence[str],
    runtimes: Sequence[Runtime],
    *,
    wait: float,
    echo: Echo,
    resolve: Resolver = _resolve,
    transport: httpx.AsyncBaseTransport | None = None,
    progress_every: float = PROGRESS_EVERY_SECONDS,
) -> bool:
    """Install `runtimes` on every upstream; True when every one is on every upstream."""
    async with httpx.AsyncClient(transport=transport) as client:
        waiter = _Waiter(echo, wait, progress_every)
        ready, unreachable = await waiter.upstreams(client, urls, resolve)
        ok = True
        for url, why in unreachable.items():
            ok = False
            for runtime in runtimes:
                echo(
                    f"{url} {runtime}: failed: did not answer /api/v2/runtimes"
                    f" within {wait:g} s ({why})"
                )

        async def per_upstream(url: str) -> bool:
            # One install at a time per upstream: Piston unpacks into one packages directory,
            # and the progress lines stay readable. Upstreams proceed side by side.
            all_there = True
            for runtime in runtimes:
                there, verdict = await _install(client, url, runtime, echo, progress_every)
                echo(f"{url} {runtime}: {verdict}")
                all_there = all_there and there
            return all_there

        results = await asyncio.gather(*(per_upstream(url) for url in ready))
        return ok and all(results)
