"""TtlCache: values kept for their time only, nothing kept at 0 s, bounded, and a change's
`forget` applied at once and again when its transaction commits."""

from __future__ import annotations

from pathlib import Path

import pytest

from workbench import cache as cache_module
from workbench.cache import TtlCache
from workbench.db import Database


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(cache_module.time, "monotonic", c)
    return c


def test_values_are_kept_for_their_time(clock: Clock) -> None:
    c: TtlCache[str, int] = TtlCache(1.0)
    c.put("a", 1)
    assert c.get("a") == 1 and c.get("b") is None
    clock.now += 1.5
    assert c.get("a") is None


def test_nothing_is_kept_at_zero_seconds(clock: Clock) -> None:
    c: TtlCache[str, int] = TtlCache(0)
    c.put("a", 1)
    assert c.get("a") is None


def test_expired_entries_make_room(clock: Clock) -> None:
    c: TtlCache[int, int] = TtlCache(1.0, max_entries=3)
    for i in range(3):
        c.put(i, i)
    clock.now += 2
    c.put(9, 9)
    assert len(c._entries) == 1 and c.get(9) == 9


async def test_forget_now_and_again_at_commit(tmp_path: Path, clock: Clock) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'c.db'}", schema=None)
    c: TtlCache[tuple[str, str], int] = TtlCache(5.0)
    c.put(("org1", "x"), 1)
    c.put(("org2", "x"), 2)
    try:
        async with db.transaction() as s:
            c.forget(s, lambda k: k[0] == "org1")
            assert c.get(("org1", "x")) is None and c.get(("org2", "x")) == 2
            c.put(("org1", "x"), 3)  # a read in between kept the value from before the change
        assert c.get(("org1", "x")) is None and c.get(("org2", "x")) == 2
    finally:
        await db.dispose()
