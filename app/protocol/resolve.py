"""Runtime resolution exactly as Piston does it (`runtime.js`).

A runtime matches when its `language` or one of its `aliases` equals the requested language and its
version satisfies the npm-style selector (`semver.satisfies`); among matches the newest wins, and
among equal versions the first listed (JavaScript's stable sort). Shared by the gateway's
RuntimeCatalog and the embedded engine, so both answer alike.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import nodesemver

__all__ = ["Runtime", "resolve_runtime", "unknown_runtime_message"]


@dataclass(frozen=True, slots=True)
class Runtime:
    language: str
    version: str
    aliases: tuple[str, ...] = ()
    runtime: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def answers_to(self, language: str) -> bool:
        return self.language == language or language in self.aliases

    def as_json(self) -> dict[str, Any]:
        """Piston's `/api/v2/runtimes` entry, with any unknown upstream fields kept."""
        data: dict[str, Any] = {**self.extra, "language": self.language, "version": self.version}
        data["aliases"] = list(self.aliases)
        if self.runtime is not None or "runtime" in self.extra:
            data["runtime"] = self.runtime
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Runtime:
        known = {"language", "version", "aliases", "runtime"}
        return cls(
            language=str(data["language"]),
            version=str(data["version"]),
            aliases=tuple(str(alias) for alias in data.get("aliases") or ()),
            runtime=data.get("runtime"),
            extra={key: value for key, value in data.items() if key not in known},
        )


def _satisfies(version: str, selector: str) -> bool:
    try:
        return bool(nodesemver.satisfies(version, selector))
    except (ValueError, TypeError):
        # node-semver's satisfies() is false for anything it cannot parse; so is ours.
        return False


def _compare(a: Runtime, b: Runtime) -> int:
    try:
        return int(nodesemver.compare(a.version, b.version, False))
    except (ValueError, TypeError):
        return 0


def resolve_runtime(runtimes: Iterable[Runtime], language: str, selector: str) -> Runtime | None:
    """The newest runtime answering to `language` whose version satisfies `selector`, or None."""
    matches: Sequence[Runtime] = [
        rt for rt in runtimes if rt.answers_to(language) and _satisfies(rt.version, selector)
    ]
    if not matches:
        return None
    # max() keeps the first of equal elements, as Piston's stable rcompare sort does.
    return max(matches, key=functools.cmp_to_key(_compare))


def unknown_runtime_message(language: str, version: str) -> str:
    return f"{language}-{version} runtime is unknown"
