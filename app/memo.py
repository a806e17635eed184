"""Values derived from immutable objects, computed once per object rather than per request.

The hot path derives the same things from a tenant (its caps, its Redis key names, its rate-limit
policy) on every request. Tenants are frozen models, replaced (not changed) when an admin edits
one, and the key cache hands the same object to every request of a key until then: so a value
derived from one object stays right for as long as that object is the one in use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["IdentityMemo"]

_Value = TypeVar("_Value")


class IdentityMemo(Generic[_Value]):
    """`memo(a, b, ...)` is `compute(a, b, ...)`, computed once per combination of objects.

    Keyed by identity (so unhashable models work too), never by equality: pass only objects
    that do not change (frozen models, settings, strings). An entry holds its objects, so their
    ids cannot be reused while it lives. At most `max_entries` are kept; past that the memo
    starts afresh (tenants come and go).
    """

    __slots__ = ("_compute", "_entries", "_max_entries")

    def __init__(self, compute: Callable[..., _Value], *, max_entries: int = 4096) -> None:
        self._compute = compute
        self._max_entries = max_entries
        self._entries: dict[tuple[int, ...], tuple[tuple[Any, ...], _Value]] = {}

    def __call__(self, *sources: Any) -> _Value:
        key = tuple(map(id, sources))
        entry = self._entries.get(key)
        if entry is not None and all(map(_same, entry[0], sources)):
            return entry[1]
        value = self._compute(*sources)
        if len(self._entries) >= self._max_entries:
            self._entries.clear()
        self._entries[key] = (sources, value)
        return value


def _same(a: object, b: object) -> bool:
    return a is b
