"""RuntimeCatalog: what the upstreams can run, and resolution of `language` + `version`.

The runtimes come from the upstreams' own `/api/v2/runtimes`, refreshed in the background by the
PistonPool. Resolution is Piston's (`app.protocol.resolve`); answers are memoised per runtime set so
the hot path does no semver work for a request it has seen before.
"""

from __future__ import annotations

from app.errors import BadRequest, ServiceUnavailable
from app.protocol.resolve import Runtime, resolve_runtime, unknown_runtime_message
from app.upstream.pool import PistonPool

__all__ = ["RuntimeCatalog"]

_MEMO_LIMIT = 4096


class RuntimeCatalog:
    def __init__(self, pool: PistonPool) -> None:
        self._pool = pool
        self._memo: dict[tuple[str, str], Runtime | None] = {}
        self._memo_version = -1

    @property
    def runtimes(self) -> list[Runtime]:
        return self._pool.runtimes

    @property
    def version(self) -> int:
        """Bumped whenever what `resolve` answers may change (the runtime or upstream set)."""
        return self._pool.version

    def find(self, language: str, selector: str) -> Runtime | None:
        if self._memo_version != self._pool.version:
            self._memo.clear()
            self._memo_version = self._pool.version
        key = (language, selector)
        try:
            return self._memo[key]
        except KeyError:
            pass
        runtime = resolve_runtime(self.runtimes, language, selector)
        if len(self._memo) >= _MEMO_LIMIT:
            self._memo.clear()  # bounded: a flood of odd selectors cannot grow memory
        if runtime is not None or self.runtimes:
            # An empty catalog (every upstream down) is not remembered as "unknown".
            self._memo[key] = runtime
        return runtime

    def resolve(self, language: str, selector: str) -> Runtime:
        """The runtime Piston would pick, or Piston's own 400 without a round trip."""
        runtime = self.find(language, selector)
        if runtime is None and not self.runtimes:
            raise ServiceUnavailable("no upstream Piston is reachable; try again shortly")
        if runtime is None:
            raise BadRequest(unknown_runtime_message(language, selector))
        return runtime
