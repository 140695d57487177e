"""uuid7: valid version-7 UUIDs that sort in the order they were made, also within one
millisecond (search cursors and newest-first listings rely on it)."""

from __future__ import annotations

import uuid

from workbench import db
from workbench.db import uuid7


def test_ids_made_in_a_burst_sort_in_creation_order() -> None:
    ids = [uuid7() for _ in range(20_000)]  # many share a millisecond
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    for u in ids[:100]:
        assert u.version == 7 and u.variant == uuid.RFC_4122


def test_ids_stay_ordered_when_the_clock_steps_back(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    first = uuid7()
    monkeypatch.setattr(db.time, "time_ns", lambda: 1_000_000_000)  # 1970: far in the past
    later = [uuid7() for _ in range(10)]
    assert all(first < u for u in later) and later == sorted(later)
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in later)


def test_counter_overflow_carries_into_the_random_bits_and_keeps_the_variant() -> None:
    with db._uuid7_lock:
        saved = db._uuid7_last
        # a last id whose 62-bit counter is all ones, in the far future
        db._uuid7_last = (((1 << 48) - 2) << 80 | 0x7 << 76 | 0x123 << 64 | 0b10 << 62
                          | ((1 << 62) - 1))
        prev = db._uuid7_last
    try:
        nxt = uuid7()
        assert nxt.int > prev and nxt.version == 7 and nxt.variant == uuid.RFC_4122
        assert (nxt.int >> 64) & 0xFFF == 0x124
    finally:
        with db._uuid7_lock:
            db._uuid7_last = saved  # ids from the far future would stay in the counter
