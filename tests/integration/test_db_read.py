"""`Database.read`: one query over committed rows outside any transaction, on SQLite (a
read-only connection in a reader thread) and PostgreSQL (a pooled asyncpg connection) — the
same typed rows as a session's, never an uncommitted row, never waiting for a writer, and no
write through it on SQLite."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import JSON, String, bindparam, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from workbench.db import Database, IdMixin, TenantMixin, TimestampMixin, new_metadata
from workbench.testing import create_pg_database, drop_pg_database


class Base(DeclarativeBase):
    metadata = new_metadata()


class Note(Base, IdMixin, TenantMixin, TimestampMixin):
    __tablename__ = "notes"
    title: Mapped[str] = mapped_column(String(100))
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)


BY_ORG = select(Note.id, Note.title, Note.meta.label("meta"), Note.created_at).where(
    Note.org_id == bindparam("org")).order_by(Note.title)


@pytest.fixture(params=["sqlite", "postgresql"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    pg = None
    if request.param == "sqlite":
        database = Database(f"sqlite+aiosqlite:///{tmp_path / 'read.sqlite3'}", schema=None)
    else:
        pg, url = await create_pg_database()
        database = Database(url, schema="wb_read")
        async with database.engine.begin() as conn:
            await conn.execute(text('CREATE SCHEMA "wb_read"'))
    try:
        async with database.engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        yield database
    finally:
        await database.dispose()
        if pg is not None:
            await drop_pg_database(pg)


async def add(db: Database, org: uuid.UUID, *titles: str) -> None:
    async with db.transaction() as s:
        s.add_all([Note(org_id=org, title=t, meta={"n": i}) for i, t in enumerate(titles)])


async def test_rows_are_typed_as_a_sessions_are(db: Database) -> None:
    org, other = uuid.uuid4(), uuid.uuid4()
    await add(db, org, "a", "b")
    await add(db, other, "c")
    rows = await db.read(BY_ORG, {"org": org})
    async with db.transaction() as s:
        expected = (await s.execute(BY_ORG, {"org": org})).all()
    assert [tuple(r) for r in rows] == [tuple(r) for r in expected]
    assert [r.title for r in rows] == ["a", "b"] and rows[1].meta == {"n": 1}
    assert isinstance(rows[0].id, uuid.UUID)
    assert rows[0].created_at.tzinfo is not None
    assert rows[0].created_at <= datetime.now(UTC)


async def test_a_read_sees_committed_rows_only_and_does_not_wait_for_the_writer(
        db: Database) -> None:
    org = uuid.uuid4()
    await add(db, org, "committed")
    async with db.transaction() as s:
        s.add(Note(org_id=org, title="not yet"))
        await s.flush()  # on SQLite this transaction holds the write lock (BEGIN IMMEDIATE)
        # A session's read here would queue behind that lock for busy_timeout (30 s).
        rows = await asyncio.wait_for(db.read(BY_ORG, {"org": org}), timeout=5)
        assert [r.title for r in rows] == ["committed"]
    rows = await db.read(BY_ORG, {"org": org})
    assert [r.title for r in rows] == ["committed", "not yet"]


async def test_concurrent_reads(db: Database) -> None:
    orgs = [uuid.uuid4() for _ in range(8)]
    for i, org in enumerate(orgs):
        await add(db, org, *(f"t{i}-{k}" for k in range(i + 1)))
    results = await asyncio.gather(*(db.read(BY_ORG, {"org": org}) for org in orgs * 5))
    assert [len(r) for r in results] == [i + 1 for i in range(8)] * 5


async def test_no_write_goes_through_the_sqlite_reader(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'ro.sqlite3'}", schema=None)
    try:
        async with db.engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        with pytest.raises(OperationalError, match="readonly"):
            await db.read(text("DELETE FROM notes"))
        with pytest.raises(OperationalError, match="no such table"):
            await db.read(text("SELECT * FROM missing"))
    finally:
        await db.dispose()
