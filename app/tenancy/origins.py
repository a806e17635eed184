"""Browser keys' origins: how an origin is written and compared, and the live set CORS consults.

An origin is `scheme://host[:port]` (what a browser sends in `Origin`); two origins are the same
when their schemes and hosts are equal ignoring case and their ports are equal, a default port
(80 for http, 443 for https) being the same as none. `normalize_origin` gives the one spelling
every comparison uses: lower-case, the default port left out.

`OriginIndex` is the set of origins of the live browser keys this process knows of, by key
digest, each with its key's expiry: an expired key's origins stop counting the moment it expires,
with no message needed.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

__all__ = ["BrowserKey", "OriginIndex", "normalize_origin"]

_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
# A host as a browser writes it in Origin: a DNS name (letters, digits, '-', '.'; IDNs arrive
# punycoded) or a bracketed IPv6 address. Nothing else: no path, query, user or trailing slash.
_ORIGIN: Final = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://"
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)"
    r"(?::(?P<port>[0-9]{1,5}))?"
)
_MAX_ORIGINS_PER_KEY: Final = 50


def normalize_origin(text: str) -> str:
    """`text` as one spelling (lower-case, no default port), or ValueError saying what is wrong."""
    match = _ORIGIN.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(
            f"{text!r} is not an origin: write scheme://host[:port], such as "
            "https://app.example.com or http://localhost:5173 (no path, no trailing slash)"
        )
    scheme, host = match.group("scheme").lower(), match.group("host").lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"{text!r} is not an origin: the scheme must be http or https")
    if ".." in host or host.startswith("."):
        raise ValueError(f"{text!r} is not an origin: {host!r} is not a host name")
    port_text = match.group("port")
    if port_text is None:
        return f"{scheme}://{host}"
    port = int(port_text)
    if not 1 <= port <= 65_535:
        raise ValueError(f"{text!r} is not an origin: the port must be between 1 and 65535")
    if port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def normalize_origins(values: Iterable[str]) -> list[str]:
    """Every origin normalized, duplicates dropped, order kept; ValueError for a bad one."""
    cleaned = list(dict.fromkeys(normalize_origin(value) for value in values))
    if not cleaned:
        raise ValueError("name at least one origin, such as https://app.example.com")
    if len(cleaned) > _MAX_ORIGINS_PER_KEY:
        raise ValueError(f"at most {_MAX_ORIGINS_PER_KEY} origins per key")
    return cleaned


def request_origin(header: str | None) -> str | None:
    """The normalized form of a request's `Origin` header, None when it is no origin at all."""
    if header is None:
        return None
    try:
        return normalize_origin(header)
    except ValueError:
        return None  # `null` (a sandboxed page, a file://) or garbage: matches no origin


@dataclass(frozen=True, slots=True)
class BrowserKey:
    """What CORS needs of a browser key: its origins and when it stops being live."""

    origins: frozenset[str]
    expires_at: float | None  # epoch seconds; None: never

    def live(self, now: float) -> bool:
        return self.expires_at is None or self.expires_at > now


class OriginIndex:
    """The origins of live browser keys, by key digest; looked up on every CORS answer."""

    def __init__(self) -> None:
        self._keys: dict[str, BrowserKey] = {}
        self._by_origin: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, digest: str, key: BrowserKey) -> None:
        self.remove(digest)
        self._keys[digest] = key
        for origin in key.origins:
            self._by_origin.setdefault(origin, set()).add(digest)

    def remove(self, digest: str) -> None:
        key = self._keys.pop(digest, None)
        if key is None:
            return
        for origin in key.origins:
            digests = self._by_origin.get(origin)
            if digests is not None:
                digests.discard(digest)
                if not digests:
                    del self._by_origin[origin]

    def replace(self, keys: dict[str, BrowserKey]) -> None:
        """Everything known at once (the load at (re)subscribe)."""
        self._keys.clear()
        self._by_origin.clear()
        for digest, key in keys.items():
            self.add(digest, key)

    def allows(self, origin: str | None, now: float | None = None) -> bool:
        """True when a live browser key lists `origin` (already normalized)."""
        if origin is None:
            return False
        digests = self._by_origin.get(origin)
        if not digests:
            return False
        moment = time.time() if now is None else now
        return any(self._keys[digest].live(moment) for digest in digests)
