"""`dns+http://NAME:PORT` upstreams: every address NAME resolves to (a Kubernetes headless Service).

The pool resolves each such entry every `GATEWAY_DISCOVERY_SECONDS` and turns each address into
an upstream `http://ADDRESS:PORT`. Resolution never runs on the event loop: the system resolver
(`loop.getaddrinfo`) runs in the loop's default executor, one thread per resolution.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["DNS_SCHEME", "DnsEntry", "Resolver", "system_resolver"]

DNS_SCHEME = "dns+http"

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""(name, port) -> the addresses it resolves to; raises OSError when it does not resolve."""


async def system_resolver(name: str, port: int) -> list[str]:
    """Every TCP address of `name` (A and AAAA), as the OS resolver gives them, sorted."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(name, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    # A scoped (link-local) address cannot be named in a URL without its zone: left out.
    return sorted({str(sockaddr[0]) for *_, sockaddr in infos if "%" not in str(sockaddr[0])})


@dataclass(frozen=True, slots=True)
class DnsEntry:
    """One `dns+http://NAME[:PORT][/prefix]` entry of GATEWAY_PISTON_URLS."""

    name: str
    port: int
    path: str  # kept on each address's URL, as for a plain upstream URL
    entry: str

    @classmethod
    def parse(cls, url: str) -> DnsEntry | None:
        """The entry, or None for a plain http(s) upstream URL."""
        parts = urlsplit(url)
        if parts.scheme != DNS_SCHEME:
            return None
        if not parts.hostname:
            raise ValueError(f"{url!r}: a dns+http entry needs a name, as dns+http://NAME:PORT")
        return cls(parts.hostname, parts.port or 80, parts.path.rstrip("/"), url.rstrip("/"))

    def url_for(self, address: str) -> str:
        """The upstream URL for one resolved address (an IPv6 address in brackets)."""
        host = address
        try:
            if ipaddress.ip_address(address.split("%", 1)[0]).version == 6:
                host = f"[{address}]"
        except ValueError:
            pass  # a resolver may answer names; they go in as they are
        return f"http://{host}:{self.port}{self.path}"
