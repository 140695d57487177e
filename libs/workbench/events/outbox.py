"""Transactional outbox: events are written in the same transaction as the state change and
relayed to the bus afterwards, so nothing is sent for work that rolled back and nothing is lost
when the bus is down. Also the processed-id table that makes consumers idempotent."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from workbench import context
from workbench.db import Database, UTCDateTime, utcnow
from workbench.events.bus import EventBus
from workbench.events.contracts import validate_event_data
from workbench.events.envelope import EventEnvelope
from workbench.polling import IdleInterval

log = logging.getLogger("workbench.outbox")

OUTBOX_PENDING = "wb_outbox_pending"


@dataclass(frozen=True)
class EventTables:
    outbox: Table
    processed: Table


def event_tables(metadata: MetaData) -> EventTables:
    """Declare the outbox and processed-event tables on a service's metadata (its migrations
    create them like any other table)."""
    outbox = Table(
        "wb_outbox",
        metadata,
        Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
               autoincrement=True),
        Column("event_id", String(64), nullable=False, unique=True),
        Column("type", String(200), nullable=False),
        Column("payload", LargeBinary, nullable=False),
        Column("created_at", UTCDateTime, nullable=False, default=utcnow),
        Column("published_at", UTCDateTime, nullable=True, index=True),
        Column("attempts", Integer, nullable=False, default=0),
        Column("last_error", Text, nullable=True),
    )
    processed = Table(
        "wb_processed_events",
        metadata,
        Column("consumer", String(100), primary_key=True),
        Column("event_id", String(64), primary_key=True),
        Column("processed_at", UTCDateTime, nullable=False, default=utcnow),
    )
    return EventTables(outbox, processed)


class Outbox:
    """What a service uses to emit events: `await outbox.record(session, type, data, ...)`."""

    def __init__(self, tables: EventTables, *, source: str) -> None:
        self.tables = tables
        self.source = source

    async def record(
        self,
        session: AsyncSession,
        type: str,
        data: dict[str, Any],
        *,
        subject: str | None = None,
        org_id: str | None = None,
        actor: str | None = None,
    ) -> EventEnvelope:
        validate_event_data(type, data)
        ctx = context.current()
        envelope = EventEnvelope(
            type=type,
            source=self.source,
            subject=subject,
            org_id=org_id,
            actor=actor,
            traceparent=ctx.traceparent if ctx else None,
            request_id=ctx.request_id if ctx else None,
            ip=ctx.client_ip if ctx else None,
            data=data,
        )
        await session.execute(
            self.tables.outbox.insert().values(
                event_id=envelope.id,
                type=envelope.type,
                payload=envelope.to_bytes(),
                created_at=utcnow(),
                attempts=0,
            )
        )
        session.info[OUTBOX_PENDING] = True
        return envelope


# The longest wait between two publish attempts while the bus is down.
MAX_BACKOFF_S = 2.0


class OutboxRelay:
    """Moves committed outbox rows to the bus in order. Woken after each commit that wrote
    events, and polls as a safety net. Several replicas may run: rows are claimed with
    SKIP LOCKED on PostgreSQL. A row that fails to publish stays and is retried with backoff."""

    def __init__(
        self,
        db: Database,
        bus: EventBus,
        tables: EventTables,
        *,
        batch_size: int = 200,
        poll_interval_s: float = 1.0,
        keep_published: timedelta = timedelta(hours=24),
    ) -> None:
        self.db, self.bus, self.tables = db, bus, tables
        self.batch_size = batch_size
        self.poll_interval_s = poll_interval_s
        self.keep_published = keep_published
        t = tables.outbox
        # Built once: a relay runs this after every commit that wrote events.
        self._pending_stmt = (select(t.c.seq, t.c.payload).where(t.c.published_at.is_(None))
                              .order_by(t.c.seq).limit(batch_size))
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._backoff = 0.0
        db.add_commit_listener(self.notify)

    def notify(self) -> None:
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="outbox-relay")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        # A last attempt so a clean shutdown leaves nothing behind that the bus could take.
        try:
            await self.relay_once()
        except Exception:
            pass

    async def _run(self) -> None:
        """Relay whenever a transaction commits, and poll every poll interval (stretching up to
        8 x while polls find nothing: `IdleInterval`). After a failed publish the relay backs
        off — 0.2 s doubling to at most `MAX_BACKOFF_S` — and commits do not cut it short:
        while the bus is down a busy service retries a few times a second at most, not once
        per commit, and resumes within `MAX_BACKOFF_S` of the bus coming back."""
        last_cleanup = 0.0
        loop = asyncio.get_running_loop()
        failing_since: float | None = None
        idle = IdleInterval(self.poll_interval_s)
        while True:
            woken = False
            if self._backoff:
                await asyncio.sleep(self._backoff)
            else:
                woken = await idle.wait(self._wake.wait())
            self._wake.clear()
            try:
                published = await self.relay_once()
                idle.found(woken or published > 0)
                while published == self.batch_size:
                    published = await self.relay_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._backoff = min(max(self._backoff * 2, 0.2), MAX_BACKOFF_S)
                if failing_since is None:
                    failing_since = loop.time()
                    log.warning("outbox relay: publish failed, retrying every %.1fs at most "
                                "until it succeeds: %s", MAX_BACKOFF_S, exc)
                else:
                    log.debug("outbox relay: publish failed again: %s", exc)
            else:
                if failing_since is not None:
                    log.info("outbox relay: publishing again after %.1fs",
                             loop.time() - failing_since)
                    failing_since = None
                self._backoff = 0.0
            if loop.time() - last_cleanup > 300:
                last_cleanup = loop.time()
                try:
                    await self._cleanup()
                except Exception as exc:
                    log.warning("outbox cleanup failed: %s", exc)

    async def relay_once(self) -> int:
        """Publish one batch of pending events; returns how many were published.

        PostgreSQL: the rows are claimed (FOR UPDATE SKIP LOCKED) in the transaction that
        publishes them, so replicas share the work. SQLite locks the whole database for a write
        transaction, so there the rows are read, published with no transaction open, and marked
        in a second one: a bus that hangs (NATS going away mid-publish) must not stall every
        writer of the service. A row published but not marked is published again next round,
        which the bus deduplicates by event id."""
        stmt = self._pending_stmt
        if self.db.is_sqlite:
            async with self.db.transaction() as session:
                rows = list((await session.execute(stmt)).all())
            if not rows:  # the usual poll: no second transaction to mark nothing
                return 0
            done, error = await self._publish(rows)
            async with self.db.transaction() as session:
                await self._mark(session, done, error)
        else:
            async with self.db.transaction() as session:
                rows = list((await session.execute(
                    stmt.with_for_update(skip_locked=True))).all())
                done, error = await self._publish(rows)
                await self._mark(session, done, error)
        if error is not None:
            raise error[1]
        return len(done)

    async def _publish(self, rows: list[Any]) -> tuple[list[int], tuple[int, Exception] | None]:
        """Publish in order until one fails: (seqs published, (failed seq, error) or None)."""
        done: list[int] = []
        for seq, payload in rows:
            try:
                await self.bus.publish(EventEnvelope.from_bytes(payload))
            except Exception as exc:
                return done, (seq, exc)
            done.append(seq)
        return done, None

    async def _mark(self, session: AsyncSession, done: list[int],
                    error: tuple[int, Exception] | None) -> None:
        t = self.tables.outbox
        if error is not None:
            seq, exc = error
            await session.execute(update(t).where(t.c.seq == seq).values(
                attempts=t.c.attempts + 1, last_error=str(exc)[:500]))
        if done:
            await session.execute(
                update(t).where(t.c.seq.in_(done)).values(published_at=utcnow()))

    async def pending(self) -> int:
        t = self.tables.outbox
        async with self.db.transaction() as session:
            count = await session.execute(
                select(func.count()).select_from(t).where(t.c.published_at.is_(None)))
            return int(count.scalar_one())

    async def _cleanup(self) -> None:
        t = self.tables.outbox
        async with self.db.transaction() as session:
            await session.execute(
                delete(t).where(t.c.published_at < utcnow() - self.keep_published)
            )


EventWork = Callable[[AsyncSession, EventEnvelope], Awaitable[None]]


def idempotent(
    db: Database, tables: EventTables, consumer: str, work: EventWork
) -> Callable[[EventEnvelope], Awaitable[None]]:
    """Wrap a handler so each event id is processed once per consumer: the processed-id row and
    the handler's writes commit together, so a redelivery after a crash is a no-op."""
    p = tables.processed

    async def handle(event: EventEnvelope) -> None:
        async with db.transaction() as session:
            ins: Any = sqlite.insert(p) if db.is_sqlite else postgresql.insert(p)
            stmt = ins.values(consumer=consumer, event_id=event.id, processed_at=utcnow())
            result = await session.execute(stmt.on_conflict_do_nothing())
            if getattr(result, "rowcount", 1) == 0:
                return
            await work(session, event)

    return handle
