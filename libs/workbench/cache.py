"""Lookups a replica keeps for a moment: rows the request path reads on every call (what a
model name resolves to, an org's safety rules, a knowledge base's settings) cost a database
round trip each; kept for `ttl_s` they cost it once. A change made through this replica forgets
its entries at once and again when it commits; other replicas see it within `ttl_s`."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """At most `max_entries` values, each kept `ttl_s` seconds (0: nothing is kept)."""

    def __init__(self, ttl_s: float, max_entries: int = 4096) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[K, tuple[float, V]] = {}

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is not None and time.monotonic() - entry[0] <= self.ttl_s:
            return entry[1]
        return None

    def put(self, key: K, value: V) -> None:
        if self.ttl_s <= 0:
            return
        now = time.monotonic()
        if len(self._entries) >= self.max_entries:
            self._entries = {k: v for k, v in self._entries.items() if now - v[0] <= self.ttl_s}
        self._entries[key] = (now, value)

    def forget(self, s: AsyncSession, match: Callable[[K], bool]) -> None:
        """Drops the entries whose key matches, now and again when `s` commits (a read in
        between may have kept the values as they were before the change)."""

        def forget(*_: Any) -> None:
            for key in [k for k in self._entries if match(k)]:
                self._entries.pop(key, None)

        forget()
        event.listen(s.sync_session, "after_commit", forget, once=True)
