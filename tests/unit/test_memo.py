"""app.memo.IdentityMemo: once per object, never confused by equal or recycled objects."""

from __future__ import annotations

import gc

from app.memo import IdentityMemo
from app.tenancy.models import Tenant


def test_computed_once_per_object_and_combination() -> None:
    calls: list[tuple[object, ...]] = []

    def compute(*sources: object) -> int:
        calls.append(sources)
        return len(calls)

    memo: IdentityMemo[int] = IdentityMemo(compute)
    a, b = Tenant(id="a"), Tenant(id="a")  # equal, but two objects: an edit makes a new one
    assert memo(a) == memo(a) == 1
    assert memo(b) == 2
    assert memo(a, "x") == 3
    assert memo(a, "x") == 3
    assert len(calls) == 3


def test_a_recycled_id_is_not_mistaken_for_the_old_object() -> None:
    memo: IdentityMemo[str] = IdentityMemo(lambda tenant: tenant.id)
    first = Tenant(id="first")
    assert memo(first) == "first"
    del first
    gc.collect()
    # The memo holds its object, so no new tenant can take the old one's id while it is kept.
    for n in range(1_000):
        assert memo(Tenant(id=f"t{n}")) == f"t{n}"


def test_bounded() -> None:
    memo: IdentityMemo[int] = IdentityMemo(lambda obj: 1, max_entries=10)
    kept = [object() for _ in range(25)]
    for obj in kept:
        memo(obj)
    assert len(memo._entries) <= 10
