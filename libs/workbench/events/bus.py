"""The event bus interface and its embedded implementation: a small durable log (SQLite) with
durable, at-least-once consumers and a dedupe window, the same semantics as JetStream."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from workbench.events.envelope import EventEnvelope
from workbench.polling import IdleInterval

log = logging.getLogger("workbench.bus")

T = TypeVar("T")
Handler = Callable[[EventEnvelope], Awaitable[None]]
# Takes a batch in one go (one transaction for many events); all are acked after it returns.
BatchHandler = Callable[[list[EventEnvelope]], Awaitable[None]]


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` is one token, `>` the rest (one or more tokens)."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


@dataclass
class ConsumerOptions:
    """Delivery settings of a durable consumer. After `max_deliver` failed attempts an event is
    parked as a dead letter (logged and recorded) and the consumer moves on."""

    max_deliver: int = 10
    backoff_s: Sequence[float] = field(default_factory=lambda: (0.1, 0.5, 2.0, 5.0))
    batch: int = 100


class Subscription(Protocol):
    async def stop(self) -> None: ...


class EventBus(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None: ...

    async def publish(self, event: EventEnvelope) -> None:
        """Store the event durably; an event whose id was seen within the dedupe window is
        accepted and dropped. Raises when the bus cannot take it (the outbox retries)."""

    async def subscribe(
        self,
        durable: str,
        subject: str,
        handler: Handler,
        options: ConsumerOptions | None = None,
    ) -> Subscription:
        """A durable consumer: every event on `subject` reaches one handler of this durable
        name at least once, across restarts; acknowledged only after `handler` returns."""

    async def subscribe_batch(
        self,
        durable: str,
        subject: str,
        handler: BatchHandler,
        options: ConsumerOptions | None = None,
    ) -> Subscription:
        """Like `subscribe`, with up to `options.batch` events per call. A batch that fails is
        retried one event at a time, so one bad event cannot hold back the others."""

    async def subscribe_broadcast(self, subject: str, handler: Handler) -> Subscription:
        """Every live process gets every new event; nothing is replayed (cache invalidation)."""


def backoff_for(options: ConsumerOptions, attempt: int) -> float:
    seq = list(options.backoff_s) or [1.0]
    return float(seq[min(attempt - 1, len(seq) - 1)])


class _Task:
    def __init__(self, task: asyncio.Task[None]) -> None:
        self._task = task

    async def stop(self) -> None:
        self._task.cancel()
        try:
            await self._task
        except (asyncio.CancelledError, Exception):
            pass


class _Broadcast:
    def __init__(self, bus: InProcessBus, entry: tuple[str, Handler]) -> None:
        self._bus, self._entry = bus, entry

    async def stop(self) -> None:
        if self._entry in self._bus._broadcast:
            self._bus._broadcast.remove(self._entry)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  subject TEXT NOT NULL,
  payload BLOB NOT NULL,
  stored_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS consumers (durable TEXT PRIMARY KEY, acked_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS dead_letters (
  durable TEXT NOT NULL, seq INTEGER NOT NULL, error TEXT NOT NULL, at REAL NOT NULL,
  PRIMARY KEY (durable, seq)
);
"""


class InProcessBus:
    """Embedded-mode bus. The log lives in a SQLite file (or in memory for tests); each durable
    consumer keeps a cursor, so a restart resumes where it stopped. Ids are unique in the log,
    which is a dedupe window as long as the retention."""

    def __init__(self, path: Path | None = None, *, retention_s: float = 7 * 86400) -> None:
        self._path = str(path) if path else ":memory:"
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
        self._conn: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()
        self._new = asyncio.Condition()
        self._broadcast: list[tuple[str, Handler]] = []
        self._tasks: list[_Task] = []
        self._retention_s = retention_s

    async def start(self) -> None:
        if self._conn is None:
            self._conn = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.executescript(_SCHEMA)
            self._conn.execute(
                "DELETE FROM events WHERE stored_at < ?", (time.time() - self._retention_s,)
            )

    async def close(self) -> None:
        for t in self._tasks:
            await t.stop()
        self._tasks.clear()
        async with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    async def ping(self) -> None:
        await self._run(lambda c: c.execute("SELECT 1").fetchone())

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            raise RuntimeError("the event bus is not started")
        conn = self._conn
        async with self._lock:
            call = asyncio.ensure_future(asyncio.to_thread(fn, conn))
            try:
                return await asyncio.shield(call)
            except asyncio.CancelledError:
                # The thread runs on regardless; keep the lock until it is done so close()
                # never pulls the connection out from under it.
                await asyncio.wait({call})
                raise

    async def publish(self, event: EventEnvelope) -> None:
        payload = event.to_bytes()

        def insert(c: sqlite3.Connection) -> bool:
            cur = c.execute(
                "INSERT OR IGNORE INTO events (id, subject, payload, stored_at) VALUES (?,?,?,?)",
                (event.id, event.type, payload, time.time()),
            )
            return cur.rowcount == 1

        fresh = await self._run(insert)
        if not fresh:
            return
        async with self._new:
            self._new.notify_all()
        for pattern, handler in list(self._broadcast):
            if subject_matches(pattern, event.type):
                try:
                    await handler(event)
                except Exception:
                    log.exception("broadcast handler failed", extra={"event_id": event.id})

    async def subscribe(
        self,
        durable: str,
        subject: str,
        handler: Handler,
        options: ConsumerOptions | None = None,
    ) -> Subscription:
        return await self._start_consumer(durable, subject, handler, None, options)

    async def subscribe_batch(
        self,
        durable: str,
        subject: str,
        handler: BatchHandler,
        options: ConsumerOptions | None = None,
    ) -> Subscription:
        return await self._start_consumer(durable, subject, None, handler, options)

    async def _start_consumer(self, durable: str, subject: str, handler: Handler | None,
                              batch_handler: BatchHandler | None,
                              options: ConsumerOptions | None) -> Subscription:
        opts = options or ConsumerOptions()
        await self._run(
            lambda c: c.execute(
                "INSERT OR IGNORE INTO consumers (durable, acked_seq) VALUES (?, 0)", (durable,)
            )
        )
        task = _Task(asyncio.create_task(
            self._consume(durable, subject, handler, batch_handler, opts)))
        self._tasks.append(task)
        return task

    async def subscribe_broadcast(self, subject: str, handler: Handler) -> Subscription:
        entry = (subject, handler)
        self._broadcast.append(entry)
        return _Broadcast(self, entry)

    async def _consume(
        self, durable: str, subject: str, handler: Handler | None,
        batch_handler: BatchHandler | None, opts: ConsumerOptions,
    ) -> None:
        like = subject.replace("*", "%").replace(">", "%")

        def fetch(c: sqlite3.Connection) -> list[tuple[int, str, bytes]]:
            (cursor,) = c.execute(
                "SELECT acked_seq FROM consumers WHERE durable = ?", (durable,)
            ).fetchone()
            rows = c.execute(
                "SELECT seq, subject, payload FROM events WHERE seq > ? AND subject LIKE ? "
                "ORDER BY seq LIMIT ?",
                (cursor, like, opts.batch),
            ).fetchall()
            return [(int(r[0]), str(r[1]), bytes(r[2])) for r in rows]

        # Woken by every publish in this process; the poll (1 s, stretching while idle) finds
        # what another process wrote to the bus's file.
        idle = IdleInterval(1.0)
        while True:
            async with self._new:
                batch = await self._run(fetch)
                idle.found(bool(batch))
                if not batch:
                    await idle.wait(self._new.wait())
                    continue
            if batch_handler is not None:
                events = [(seq, EventEnvelope.from_bytes(p)) for seq, subj, p in batch
                          if subject_matches(subject, subj)]
                if events:
                    await self._deliver_batch(durable, events, batch_handler, opts)
                await self._ack(durable, batch[-1][0])
                continue
            assert handler is not None
            for seq, subj, payload in batch:
                if subject_matches(subject, subj):
                    event = EventEnvelope.from_bytes(payload)
                    await self._deliver(durable, seq, event, handler, opts)
                await self._ack(durable, seq)

    async def _ack(self, durable: str, seq: int) -> None:
        def ack(c: sqlite3.Connection) -> None:
            c.execute("UPDATE consumers SET acked_seq = ? WHERE durable = ?", (seq, durable))

        await self._run(ack)

    async def _deliver_batch(self, durable: str, events: list[tuple[int, EventEnvelope]],
                             handler: BatchHandler, opts: ConsumerOptions) -> None:
        try:
            await handler([e for _, e in events])
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("batch handler failed (%s); delivering one event at a time", exc,
                        extra={"durable": durable})

        async def one(event: EventEnvelope) -> None:
            await handler([event])

        for seq, event in events:
            await self._deliver(durable, seq, event, one, opts)

    async def _deliver(
        self, durable: str, seq: int, event: EventEnvelope, handler: Handler,
        opts: ConsumerOptions,
    ) -> None:
        for attempt in range(1, opts.max_deliver + 1):
            try:
                await handler(event)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if attempt == opts.max_deliver:
                    error = repr(exc)
                    log.error(
                        "event parked as dead letter after %d attempts: %s",
                        attempt,
                        exc,
                        extra={"event_id": event.id, "durable": durable},
                    )
                    await self._park(durable, seq, error)
                    return
                log.warning(
                    "handler failed (attempt %d), retrying: %s",
                    attempt,
                    exc,
                    extra={"event_id": event.id, "durable": durable},
                )
                await asyncio.sleep(backoff_for(opts, attempt))

    async def _park(self, durable: str, seq: int, error: str) -> None:
        def park(c: sqlite3.Connection) -> None:
            c.execute("INSERT OR REPLACE INTO dead_letters VALUES (?,?,?,?)",
                      (durable, seq, error, time.time()))

        await self._run(park)

    async def dead_letters(self, durable: str) -> list[tuple[int, str]]:
        rows = await self._run(
            lambda c: c.execute(
                "SELECT seq, error FROM dead_letters WHERE durable = ? ORDER BY seq", (durable,)
            ).fetchall()
        )
        return [(int(r[0]), str(r[1])) for r in rows]
