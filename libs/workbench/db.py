"""Async database access for a service: one engine per service, SQLite file (embedded) or a
PostgreSQL schema (distributed), and one transaction per unit of work."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import (
    DateTime,
    Engine,
    MetaData,
    Row,
    TypeDecorator,
    Uuid,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.sql import Executable

from workbench.settings import CoreSettings, DatabaseSettings, RunMode

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp on every backend: SQLite stores no offset, so values are
    normalised to UTC on the way in and marked UTC on the way out."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC)
            if dialect.name == "sqlite":
                value = value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


def utcnow() -> datetime:
    return datetime.now(UTC)


_uuid7_last = 0
_uuid7_lock = threading.Lock()


def uuid7() -> uuid.UUID:
    """Time-ordered UUID (RFC 9562 v7): ids sort by creation, which makes cursors simple.
    Monotonic within the process (RFC 9562 §6.2, method 2): ids made in the same millisecond,
    or after the clock stepped back, follow the previous one by one."""
    global _uuid7_last
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    with _uuid7_lock:
        if value <= _uuid7_last:
            value = _uuid7_last + 1
            if (value >> 62) & 0b11 != 0b10:  # the 62-bit counter overflowed into the variant
                value = (((value >> 64) + 1) << 64) | (0b10 << 62)
        _uuid7_last = value
    return uuid.UUID(int=value)


def new_metadata() -> MetaData:
    """Each service has its own metadata (its own tables, its own migrations)."""
    return MetaData(naming_convention=NAMING_CONVENTION)


class IdMixin:
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid7)


class TimestampMixin:
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime, default=utcnow, onupdate=utcnow
    )


class TenantMixin:
    """Every tenant-owned row carries its org; repositories filter on it."""

    org_id: Mapped[uuid.UUID] = mapped_column(Uuid, index=True)


def schema_for(service: str) -> str:
    return f"wb_{service}"


class Database:
    """Owns a service's engine and session factory; created in the lifespan, closed there."""

    def __init__(self, url: str, *, schema: str | None, echo: bool = False, pool_size: int = 10):
        self.url = url
        self.schema = schema
        # orjson for JSON columns: several times faster than json, same JSON out.
        kwargs: dict[str, Any] = {"echo": echo, "json_serializer": _json_dumps,
                                  "json_deserializer": orjson.loads}
        backend = make_url(url).get_backend_name()
        self.is_sqlite = backend == "sqlite"
        if self.is_sqlite:
            kwargs["connect_args"] = {"timeout": 30}
        else:
            # Generic plans cached while a table is nearly empty (e.g. `IN (<500 params>)` as
            # a full scan) stay bad until autoanalyze; custom plans track the data.
            kwargs["connect_args"] = {"server_settings": {"plan_cache_mode": "force_custom_plan"}}
            kwargs["pool_size"] = pool_size
            kwargs["max_overflow"] = pool_size
            kwargs["pool_pre_ping"] = True
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
            event.listen(self.engine.sync_engine, "begin", _sqlite_begin_immediate)
        elif schema:
            # Tables are declared without a schema; each service's schema is applied here, so
            # one set of models serves SQLite files and PostgreSQL schemas alike.
            self.engine = self.engine.execution_options(schema_translate_map={None: schema})
        self.sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False)
        self._commit_listeners: list[Callable[[], None]] = []
        self._read_kwargs = kwargs
        self._reader: Engine | None = None
        self._read_threads: ThreadPoolExecutor | None = None

    def add_commit_listener(self, fn: Callable[[], None]) -> None:
        """Called after a transaction that wrote outbox events commits (wakes the relay)."""
        self._commit_listeners.append(fn)

    def after_commit(self, session: AsyncSession) -> None:
        if session.info.pop("wb_outbox_pending", False):
            for fn in self._commit_listeners:
                fn()

    @classmethod
    def for_service(
        cls, service: str, core: CoreSettings, db: DatabaseSettings
    ) -> Database:
        url = db.database_url
        if not url:
            if core.mode is RunMode.DISTRIBUTED:
                raise ValueError("WB_DATABASE_URL (PostgreSQL) is required in distributed mode")
            path = Path(core.data_dir) / "db" / f"{service}.sqlite3"
            path.parent.mkdir(parents=True, exist_ok=True)
            url = f"sqlite+aiosqlite:///{path}"
        schema = None if url.startswith("sqlite") else schema_for(service)
        return cls(url, schema=schema, echo=db.db_echo, pool_size=db.db_pool_size)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """One unit of work: commits when the block ends, rolls back when it raises."""
        async with self.sessionmaker() as session:
            async with session.begin():
                yield session
            self.after_commit(session)

    async def read(self, statement: Executable, params: Mapping[str, Any] | None = None
                   ) -> Sequence[Row[Any]]:
        """The rows of one query over committed data, outside any transaction of the caller's:
        for the hot read paths (a knowledge base's retrieval) that need no unit of work.

        On SQLite the query runs on a connection of its own (`PRAGMA query_only`: a write
        fails loudly) in a reader thread, in one hand-off; through aiosqlite a transaction
        hands each step (begin, cursor, execute, fetch, commit) to its connection's thread in
        turn (1.6 ms against 0.2 ms for a one-row-per-id SELECT, measured), and every
        transaction here begins IMMEDIATE, so a read waits while a writer holds the lock.
        A read in autocommit mode does not take the write lock, and under WAL it never waits
        for a writer. On PostgreSQL: a pooled connection of the engine."""
        if not self.is_sqlite:
            async with self.engine.connect() as conn:
                return (await conn.execute(statement, params or {})).all()
        reader = self._sqlite_reader()

        def run() -> Sequence[Row[Any]]:
            with reader.connect() as conn:
                return conn.execute(statement, params or {}).all()

        assert self._read_threads is not None
        return await asyncio.get_running_loop().run_in_executor(self._read_threads, run)

    def _sqlite_reader(self) -> Engine:
        if self._reader is None:
            url = make_url(self.url).set(drivername="sqlite")
            # As many reader threads as pooled connections: a read never waits for one.
            threads = 4
            reader = create_engine(url, pool_size=threads, max_overflow=0,
                                   **self._read_kwargs)
            event.listen(reader, "connect", _sqlite_reader_pragmas)
            self._read_threads = ThreadPoolExecutor(threads, thread_name_prefix="db-read")
            self._reader = reader
        return self._reader

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        await self.engine.dispose()
        if self._reader is not None:
            self._reader.dispose()
            self._reader = None
        if self._read_threads is not None:
            self._read_threads.shutdown(wait=True)
            self._read_threads = None


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _sqlite_begin_immediate(conn: Any) -> None:
    # A deferred transaction that reads and then writes can fail at once with "database is
    # locked" when another writer got there first; taking the write lock up front makes
    # writers queue on busy_timeout instead.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # pysqlite's own transaction handling is switched off so the "begin" hook owns BEGIN.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    # WAL lets the outbox relay read while a request writes; foreign keys are off by default.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _sqlite_reader_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # Autocommit: each read is its own implicit transaction, which under WAL takes no lock a
    # writer holds; query_only makes a write through the reader an error, not a surprise.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA query_only=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()
