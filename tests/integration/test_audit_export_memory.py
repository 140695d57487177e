"""An organization with a million audit records exports them — CSV and JSON Lines — in constant
memory: the export reads batches in short transactions and yields each as it is written, so the
Python heap's peak while streaming a million records is no larger than for ten thousand.

The records are written straight into PostgreSQL with one INSERT … SELECT generate_series (the
export reads rows; it does not verify the chain). Slow: `make test-slow` and CI run it."""

from __future__ import annotations

import tracemalloc
import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text

from services.audit import app as audit_app
from services.audit.events import Events
from services.audit.service import AuditService, Filters
from services.audit.settings import AuditSettings
from workbench.db import Database
from workbench.identity.principal import Principal, Role
from workbench.migrations import upgrade
from workbench.testing import create_pg_database, drop_pg_database

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

BIG, SMALL = 1_000_000, 10_000
BIG_ORG, SMALL_ORG = uuid.uuid4(), uuid.uuid4()


@pytest.fixture(scope="module")
async def db() -> AsyncIterator[Database]:
    name, url = await create_pg_database("wb_audit_export")
    settings = AuditSettings(mode="distributed", database_url=url,
                             secret_key="export-test-secret-0123456789abcdef",
                             internal_token="export-test-internal-0123456789ab",
                             jwks_url="http://127.0.0.1:9/unused",
                             s3_endpoint="http://127.0.0.1:9", s3_access_key="a",
                             s3_secret_key="b", s3_bucket="c")
    database = Database.for_service("audit", settings, settings)
    try:
        await upgrade(database, audit_app.MIGRATIONS, "audit")
        await fill(database, BIG_ORG, BIG)
        await fill(database, SMALL_ORG, SMALL)
        yield database
    finally:
        await database.dispose()
        await drop_pg_database(name)


async def fill(db: Database, org: uuid.UUID, n: int) -> None:
    async with db.transaction() as s:
        await s.execute(text("""
            INSERT INTO wb_audit.audit_records (id, org_id, chain, seq, event_id, event_type,
                action, actor, resource_type, resource_id, status, ip, request_id, trace_id,
                details, occurred_at, recorded_at, prev_hash, hash)
            SELECT gen_random_uuid(), CAST(:org_id AS uuid), CAST(:org AS text), g,
                   CAST(:org AS text) || '-' || g,
                   'wb.user.project.created', 'create', 'user:' || (g % 97),
                   'user.project', 'p-' || g, NULL, '10.0.0.' || (g % 250), md5(g::text),
                   NULL, json_build_object('name', 'Project ' || g, 'n', g),
                   now() - make_interval(secs => :n - g), now(), repeat('0', 64),
                   md5(g::text) || md5(g::text)
            FROM generate_series(1, :n) AS g
        """), {"org": str(org), "org_id": str(org), "n": n})


async def export_peak(service: AuditService, org: uuid.UUID, fmt: str) -> tuple[int, int, int]:
    """(lines, bytes, peak traced heap bytes) of a full export."""
    p = Principal.build(uuid.uuid4(), org, Role.OWNER)
    lines = size = 0
    tracemalloc.start()
    try:
        async for chunk in service.export(p, Filters(), fmt):
            lines += chunk.count(b"\n")
            size += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return lines, size, peak


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
async def test_a_million_records_export_in_constant_memory(db: Database, fmt: str) -> None:
    big, small = BIG_ORG, SMALL_ORG
    service = AuditService(db, None, Events())  # type: ignore[arg-type]
    header = 1 if fmt == "csv" else 0
    s_lines, s_bytes, s_peak = await export_peak(service, small, fmt)
    b_lines, b_bytes, b_peak = await export_peak(service, big, fmt)
    print(f"\n{fmt}: {SMALL:,} records {s_bytes / 2**20:.1f} MiB, heap peak "
          f"{s_peak / 2**20:.1f} MiB; {BIG:,} records {b_bytes / 2**20:.0f} MiB, heap peak "
          f"{b_peak / 2**20:.1f} MiB")
    assert (s_lines, b_lines) == (SMALL + header, BIG + header)
    assert b_bytes > 90 * s_bytes
    # constant: a hundred times the records, not more than a little more heap
    assert b_peak < s_peak * 1.5 + (4 << 20), (s_peak, b_peak)
    assert b_peak < 64 << 20
