"""The embedded event bus (durable SQLite log, durable consumers, dead letters, broadcast) and
the transactional outbox with its relay and the idempotent-consumer wrapper, on SQLite."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from workbench.db import Database, new_metadata
from workbench.events.bus import ConsumerOptions, InProcessBus, subject_matches
from workbench.events.envelope import EventEnvelope
from workbench.events.outbox import (
    MAX_BACKOFF_S,
    OUTBOX_PENDING,
    EventTables,
    Outbox,
    OutboxRelay,
    event_tables,
    idempotent,
)

FAST = ConsumerOptions(max_deliver=10, backoff_s=(0.01,))
REGISTERED = "wb.user.user.registered"


def event(type: str = REGISTERED, **data: Any) -> EventEnvelope:
    payload = data or {"user_id": uuid.uuid4().hex, "email": "ada@example.com",
                       "username": "ada", "org_id": uuid.uuid4().hex}
    return EventEnvelope(type=type, source="wb/test", data=payload)


async def eventually(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


class Recorder:
    """A handler that records every delivery (event ids in order)."""

    def __init__(self, fail: Callable[[EventEnvelope, int], bool] | None = None) -> None:
        self.calls: list[str] = []
        self._fail = fail

    async def __call__(self, ev: EventEnvelope) -> None:
        self.calls.append(ev.id)
        if self._fail and self._fail(ev, self.calls.count(ev.id)):
            raise RuntimeError(f"handler failed on {ev.id}")


async def quiet_close(bus: InProcessBus) -> None:
    """Stop the consumers and let a cancelled consumer's in-flight SQLite call finish before
    the connection closes: `close()` alone can crash the process (see
    test_closing_bus_while_its_consumer_is_busy_does_not_crash_the_process)."""
    for task in list(bus._tasks):
        await task.stop()
    await asyncio.sleep(0.05)
    await bus.close()


@pytest.fixture
async def bus(tmp_path: Path) -> AsyncIterator[InProcessBus]:
    b = InProcessBus(tmp_path / "bus" / "events.sqlite3")
    await b.start()
    yield b
    await quiet_close(b)


# ---- subject matching ---------------------------------------------------------------------


@pytest.mark.parametrize(("pattern", "subject", "matches"), [
    ("wb.>", "wb.user.user.registered", True),
    ("wb.>", "wb.user", True),
    ("wb.>", "wb", False),
    ("wb.>", "xb.user.user.registered", False),
    ("wb.user.>", "wb.user.api_key.created", True),
    ("wb.user.>", "wb.users.api_key.created", False),
    ("wb.*.x", "wb.a.x", True),
    ("wb.*.x", "wb.a.y", False),
    ("wb.*.x", "wb.a.b.x", False),
    ("wb.*.x", "wb.x", False),
    ("wb.*.x", "wb.a.x.y", False),
    ("wb.user.user.registered", "wb.user.user.registered", True),
    ("wb.user.user.registered", "wb.user.user.registered.extra", False),
    ("*.*.*.*", "wb.user.user.registered", True),
])
def test_subject_matches_follows_nats_wildcards(pattern: str, subject: str,
                                                matches: bool) -> None:
    assert subject_matches(pattern, subject) is matches


# ---- durable consumers --------------------------------------------------------------------


async def test_durable_consumer_receives_events_published_before_it_subscribed(
        bus: InProcessBus) -> None:
    early = [event() for _ in range(3)]
    for ev in early:
        await bus.publish(ev)
    rec = Recorder()
    await bus.subscribe("late", "wb.user.>", rec, FAST)
    await eventually(lambda: len(rec.calls) >= 3)
    assert rec.calls == [ev.id for ev in early]


async def test_durable_consumer_gets_only_events_matching_its_subject(
        bus: InProcessBus) -> None:
    wanted = event("wb.user.org.deleted", org_id="o1")
    await bus.publish(event("wb.billing.invoice.paid", invoice_id="i1"))
    await bus.publish(event("wb.user.user.logged_out", user_id="u1", session_id="s1"))
    await bus.publish(wanted)
    rec = Recorder()
    await bus.subscribe("orgs", "wb.user.org.*", rec, FAST)
    await eventually(lambda: len(rec.calls) >= 1)
    await asyncio.sleep(0.1)
    assert rec.calls == [wanted.id]


async def test_restarted_bus_resumes_after_last_acked_event_without_redelivery(
        tmp_path: Path) -> None:
    path = tmp_path / "events.sqlite3"
    first_bus = InProcessBus(path)
    await first_bus.start()
    before = [event(), event()]
    for ev in before:
        await first_bus.publish(ev)
    first = Recorder()
    await first_bus.subscribe("svc", "wb.>", first, FAST)
    await eventually(lambda: len(first.calls) == 2)

    def acked() -> int:
        with sqlite3.connect(path) as conn:
            row = conn.execute("SELECT acked_seq FROM consumers WHERE durable = 'svc'").fetchone()
            return int(row[0])

    await eventually(lambda: acked() == 2)
    await quiet_close(first_bus)

    second_bus = InProcessBus(path)
    await second_bus.start()
    try:
        after = event()
        await second_bus.publish(after)
        second = Recorder()
        await second_bus.subscribe("svc", "wb.>", second, FAST)
        await eventually(lambda: len(second.calls) >= 1)
        await asyncio.sleep(0.1)
        assert first.calls == [ev.id for ev in before]
        assert second.calls == [after.id]
    finally:
        await quiet_close(second_bus)


CLOSE_WHILE_BUSY = """
import asyncio, pathlib, sys, tempfile
from workbench.events.bus import ConsumerOptions, InProcessBus
from workbench.events.envelope import EventEnvelope

async def main():
    d = pathlib.Path(tempfile.mkdtemp())
    for i in range(300):
        bus = InProcessBus(d / f"e{i}.sqlite3")
        await bus.start()
        async def handler(ev):
            pass
        await bus.subscribe("svc", "wb.>", handler, ConsumerOptions(backoff_s=(0.01,)))
        await bus.publish(EventEnvelope(type="wb.test.thing.happened", source="wb/test"))
        await asyncio.sleep(0.001 * (i % 7))
        await bus.close()
    print("closed cleanly")

asyncio.run(main())
"""


def test_closing_bus_while_its_consumer_is_busy_does_not_crash_the_process(
        tmp_path: Path) -> None:
    # close() cancels the consumer task, but a cancelled asyncio.to_thread call keeps running
    # on the SQLite connection that close() then closes under it. Run in a child process: a
    # crash must fail this test, not the test session.
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", CLOSE_WHILE_BUSY],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stderr[-2000:]}"
    assert "closed cleanly" in proc.stdout


async def test_each_durable_name_gets_every_event(bus: InProcessBus) -> None:
    a, b = Recorder(), Recorder()
    await bus.subscribe("a", "wb.>", a, FAST)
    await bus.subscribe("b", "wb.>", b, FAST)
    events = [event() for _ in range(3)]
    for ev in events:
        await bus.publish(ev)
    await eventually(lambda: len(a.calls) == 3 and len(b.calls) == 3)
    assert a.calls == b.calls == [ev.id for ev in events]


async def test_same_event_id_published_twice_is_delivered_once(bus: InProcessBus) -> None:
    rec = Recorder()
    await bus.subscribe("svc", "wb.>", rec, FAST)
    dup, marker = event(), event()
    await bus.publish(dup)
    await bus.publish(dup)
    await bus.publish(EventEnvelope.from_bytes(dup.to_bytes()))  # same id, new object
    await bus.publish(marker)
    await eventually(lambda: marker.id in rec.calls)
    await asyncio.sleep(0.1)
    assert rec.calls == [dup.id, marker.id]


async def test_handler_failing_twice_gets_event_three_times_then_the_next_event(
        bus: InProcessBus) -> None:
    flaky, nxt = event(), event()
    rec = Recorder(fail=lambda ev, n: ev.id == flaky.id and n <= 2)
    await bus.subscribe("svc", "wb.>", rec, FAST)
    await bus.publish(flaky)
    await bus.publish(nxt)
    await eventually(lambda: nxt.id in rec.calls)
    await asyncio.sleep(0.1)
    assert rec.calls == [flaky.id, flaky.id, flaky.id, nxt.id]
    assert await bus.dead_letters("svc") == []


async def test_always_failing_handler_parks_event_as_dead_letter_and_moves_on(
        bus: InProcessBus) -> None:
    poison, nxt = event(), event()
    rec = Recorder(fail=lambda ev, _n: ev.id == poison.id)
    await bus.subscribe("svc", "wb.>", rec, ConsumerOptions(max_deliver=3, backoff_s=(0.01,)))
    await bus.publish(poison)
    await bus.publish(nxt)
    await eventually(lambda: nxt.id in rec.calls)
    await asyncio.sleep(0.1)
    assert rec.calls == [poison.id] * 3 + [nxt.id]
    letters = await bus.dead_letters("svc")
    assert len(letters) == 1
    seq, error = letters[0]
    assert seq == 1 and "handler failed" in error


# ---- broadcast ----------------------------------------------------------------------------


async def test_broadcast_subscriber_gets_new_matching_events(bus: InProcessBus) -> None:
    rec = Recorder()
    await bus.subscribe_broadcast("wb.user.>", rec)
    mine, other = event(), event("wb.billing.invoice.paid", invoice_id="i1")
    await bus.publish(mine)
    await bus.publish(other)
    await bus.publish(mine)  # a duplicate is dropped for broadcast too
    assert rec.calls == [mine.id]


async def test_broadcast_subscriber_gets_no_replay_of_earlier_events(bus: InProcessBus) -> None:
    await bus.publish(event())
    rec = Recorder()
    sub = await bus.subscribe_broadcast("wb.>", rec)
    fresh = event()
    await bus.publish(fresh)
    await sub.stop()
    await bus.publish(event())
    assert rec.calls == [fresh.id]


async def test_failing_broadcast_handler_does_not_fail_the_publish(bus: InProcessBus) -> None:
    rec = Recorder(fail=lambda _ev, _n: True)
    await bus.subscribe_broadcast("wb.>", rec)
    durable = Recorder()
    await bus.subscribe("svc", "wb.>", durable, FAST)
    ev = event()
    await bus.publish(ev)
    await eventually(lambda: durable.calls == [ev.id])
    assert rec.calls == [ev.id]


# ---- outbox and relay ---------------------------------------------------------------------


class FakeBus:
    """Records what was published; raises while `down`."""

    def __init__(self) -> None:
        self.published: list[EventEnvelope] = []
        self.down = False

    async def publish(self, ev: EventEnvelope) -> None:
        if self.down:
            raise ConnectionError("bus is down")
        self.published.append(ev)


class Store:
    def __init__(self, db: Database, tables: EventTables, counter: Table) -> None:
        self.db, self.tables, self.counter = db, tables, counter
        self.outbox = Outbox(tables, source="wb/test")

    async def outbox_rows(self) -> list[dict[str, Any]]:
        t = self.tables.outbox
        async with self.db.transaction() as s:
            rows = (await s.execute(select(t).order_by(t.c.seq))).mappings().all()
            return [dict(r) for r in rows]

    async def record(self, s: AsyncSession, user_id: str) -> EventEnvelope:
        return await self.outbox.record(
            s, REGISTERED, {"user_id": user_id, "email": "ada@example.com",
                            "username": "ada", "org_id": "o1"}, subject=user_id)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'svc.sqlite3'}", schema=None)
    md: MetaData = new_metadata()
    tables = event_tables(md)
    counter = Table("work_done", md, Column("id", Integer, primary_key=True, autoincrement=True),
                    Column("event_id", String(64), nullable=False))
    async with db.engine.begin() as conn:
        await conn.run_sync(md.create_all)
    yield Store(db, tables, counter)
    await db.dispose()


async def test_event_recorded_in_rolled_back_transaction_is_never_published(
        store: Store) -> None:
    fake = FakeBus()
    relay = OutboxRelay(store.db, fake, store.tables)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="boom"):
        async with store.db.transaction() as s:
            await store.record(s, "u1")
            raise RuntimeError("boom")
    assert await relay.relay_once() == 0
    assert fake.published == []
    assert await store.outbox_rows() == []


async def test_committed_event_is_published_by_the_relay_woken_on_commit(store: Store) -> None:
    fake = FakeBus()
    # A long poll interval: only the commit listener can make this fast.
    relay = OutboxRelay(store.db, fake, store.tables, poll_interval_s=30)  # type: ignore[arg-type]
    relay.start()
    try:
        async with store.db.transaction() as s:
            env = await store.record(s, "u1")
        await eventually(lambda: len(fake.published) == 1, timeout=3)
    finally:
        await relay.stop()
    assert fake.published[0].id == env.id
    assert fake.published[0].data["user_id"] == "u1"
    [row] = await store.outbox_rows()
    assert row["event_id"] == env.id and row["published_at"] is not None
    assert await relay.pending() == 0


async def test_relay_publishes_in_commit_order(store: Store) -> None:
    fake = FakeBus()
    relay = OutboxRelay(store.db, fake, store.tables)  # type: ignore[arg-type]
    ids = []
    for i in range(5):
        async with store.db.transaction() as s:
            ids.append((await store.record(s, f"u{i}")).id)
    assert await relay.relay_once() == 5
    assert [e.id for e in fake.published] == ids


async def test_failed_publish_keeps_row_unpublished_with_attempts_and_retries_later(
        store: Store) -> None:
    fake = FakeBus()
    fake.down = True
    relay = OutboxRelay(store.db, fake, store.tables)  # type: ignore[arg-type]
    async with store.db.transaction() as s:
        env = await store.record(s, "u1")
    for attempt in (1, 2):
        with pytest.raises(ConnectionError):
            await relay.relay_once()
        [row] = await store.outbox_rows()
        assert row["published_at"] is None
        assert row["attempts"] == attempt
        assert "bus is down" in row["last_error"]
    assert await relay.pending() == 1

    fake.down = False
    assert await relay.relay_once() == 1
    assert [e.id for e in fake.published] == [env.id]
    [row] = await store.outbox_rows()
    assert row["published_at"] is not None
    assert await relay.relay_once() == 0  # nothing is published twice
    assert len(fake.published) == 1


async def test_running_relay_retries_until_bus_comes_back(store: Store) -> None:
    fake = FakeBus()
    fake.down = True
    relay = OutboxRelay(store.db, fake, store.tables, poll_interval_s=0.05)  # type: ignore[arg-type]
    relay.start()
    try:
        async with store.db.transaction() as s:
            env = await store.record(s, "u1")
        await asyncio.sleep(0.5)
        assert fake.published == []
        fake.down = False
        await eventually(lambda: len(fake.published) == 1, timeout=12)
    finally:
        await relay.stop()
    assert fake.published[0].id == env.id
    [row] = await store.outbox_rows()
    assert row["published_at"] is not None and row["attempts"] >= 1


async def test_idle_relay_polls_less_and_less_yet_relays_a_commit_at_once(store: Store) -> None:
    """Polls that find nothing stretch the wait (0.1, 0.2, 0.4, then 0.8 s: 8 x the interval);
    a commit still wakes the relay at once, and a row that no commit of this process announced
    (another replica's) is still found by a poll."""
    fake = FakeBus()
    relay = OutboxRelay(store.db, fake, store.tables, poll_interval_s=0.1)  # type: ignore[arg-type]
    polls = 0
    relay_once = relay.relay_once

    async def counted() -> int:
        nonlocal polls
        polls += 1
        return await relay_once()

    relay.relay_once = counted  # type: ignore[method-assign]
    relay.start()
    loop = asyncio.get_running_loop()
    try:
        await asyncio.sleep(2.4)
        # Every 0.1 s that would be 24 polls; stretched: about 5 (0.1, 0.3, 0.7, 1.5, 2.3).
        assert 3 <= polls <= 8, polls
        started = loop.time()
        async with store.db.transaction() as s:
            await store.record(s, "u1")
        await eventually(lambda: len(fake.published) == 1, timeout=3)
        assert loop.time() - started < 0.5  # woken by the commit, not the next poll
        async with store.db.transaction() as s:  # written as another replica would: no wake-up
            await store.record(s, "u2")
            s.info.pop(OUTBOX_PENDING)
        await eventually(lambda: len(fake.published) == 2, timeout=3)
    finally:
        await relay.stop()
    # The stop may cancel the pass between publishing u2 and marking it; its last pass then
    # publishes u2 again (at least once: the bus deduplicates by event id).
    assert list(dict.fromkeys(e.data["user_id"] for e in fake.published)) == ["u1", "u2"]
    assert len({e.id for e in fake.published}) == 2


class CountingBus(FakeBus):
    def __init__(self) -> None:
        super().__init__()
        self.attempts = 0

    async def publish(self, ev: EventEnvelope) -> None:
        self.attempts += 1
        await super().publish(ev)


async def test_commits_during_an_outage_do_not_each_retry_and_relay_resumes_within_the_cap(
        store: Store) -> None:
    """While the bus is down, 40 commits over ~2 s wake the relay 40 times; the backoff holds:
    a handful of attempts, not one per commit. Once the bus is back, everything held is
    published within the longest backoff (plus a margin), though nothing commits any more."""
    fake = CountingBus()
    fake.down = True
    relay = OutboxRelay(store.db, fake, store.tables, poll_interval_s=30)  # type: ignore[arg-type]
    relay.start()
    try:
        for i in range(40):
            async with store.db.transaction() as s:
                await store.record(s, f"u{i}")
            await asyncio.sleep(0.05)
        # 0.2 + 0.4 + 0.8 + ... capped at MAX_BACKOFF_S: about 5 attempts in ~2 s
        assert 2 <= fake.attempts <= 10, fake.attempts
        fake.down = False
        loop = asyncio.get_running_loop()
        back = loop.time()
        await eventually(lambda: len(fake.published) == 40, timeout=MAX_BACKOFF_S + 3)
        assert loop.time() - back <= MAX_BACKOFF_S + 1.0
    finally:
        await relay.stop()
    assert await relay.pending() == 0


def _work(store: Store, ran: list[str], fail: bool = False
          ) -> Callable[[AsyncSession, EventEnvelope], Awaitable[None]]:
    async def work(s: AsyncSession, ev: EventEnvelope) -> None:
        ran.append(ev.id)
        await s.execute(store.counter.insert().values(event_id=ev.id))
        if fail:
            raise RuntimeError("work failed")
    return work


async def _count_work(store: Store) -> int:
    async with store.db.transaction() as s:
        return int((await s.execute(select(func.count()).select_from(store.counter))).scalar_one())


async def test_idempotent_handler_runs_work_once_for_duplicate_event_id(store: Store) -> None:
    ran: list[str] = []
    handle = idempotent(store.db, store.tables, "indexer", _work(store, ran))
    ev = event()
    await handle(ev)
    await handle(ev)
    await handle(EventEnvelope.from_bytes(ev.to_bytes()))
    assert ran == [ev.id]
    assert await _count_work(store) == 1


async def test_idempotent_handler_runs_work_once_per_consumer(store: Store) -> None:
    ran: list[str] = []
    ev = event()
    await idempotent(store.db, store.tables, "indexer", _work(store, ran))(ev)
    await idempotent(store.db, store.tables, "mailer", _work(store, ran))(ev)
    assert ran == [ev.id, ev.id]


async def test_idempotent_handler_runs_work_again_after_it_failed(store: Store) -> None:
    ran: list[str] = []
    ev = event()
    with pytest.raises(RuntimeError, match="work failed"):
        await idempotent(store.db, store.tables, "indexer", _work(store, ran, fail=True))(ev)
    assert await _count_work(store) == 0  # the failed work and its processed-id rolled back
    await idempotent(store.db, store.tables, "indexer", _work(store, ran))(ev)
    assert ran == [ev.id, ev.id]
    assert await _count_work(store) == 1
