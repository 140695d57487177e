"""The audit domain: append events to per-org hash chains (idempotently, in batches), verify a
chain, search and export records, apply retention, summarise a period."""

from __future__ import annotations

import csv
import gzip
import io
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import String, bindparam, cast, delete, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from services.audit.events import Events
from services.audit.models import (
    GENESIS_HASH,
    Archive,
    AuditRecord,
    ChainHead,
    RetentionPolicy,
)
from services.audit.records import canonical, chain_of, record_hash, record_values
from workbench.db import Database, utcnow
from workbench.errors import BadRequest, Conflict, NotFound
from workbench.events.envelope import EventEnvelope
from workbench.identity.principal import Principal
from workbench.storage import ObjectStore

EXPORT_BATCH = 1000
RECORDS = AuditRecord.__table__
HEADS = ChainHead.__table__
COPY_COLUMNS = [c.name for c in RECORDS.columns]
CSV_COLUMNS = ["id", "seq", "occurred_at", "recorded_at", "action", "actor", "resource_type",
               "resource_id", "event_type", "status", "ip", "request_id", "trace_id",
               "details", "hash"]


class Filters:
    """Search filters, shared by search, export and summary."""

    def __init__(self, *, actor: str | None = None, action: str | None = None,
                 resource_type: str | None = None, resource_id: str | None = None,
                 event_type: str | None = None, since: datetime | None = None,
                 until: datetime | None = None, q: str | None = None) -> None:
        if since and until and since > until:
            raise BadRequest("`since` is after `until`", code="invalid_period")
        self.values = {"actor": actor, "action": action, "resource_type": resource_type,
                       "resource_id": resource_id, "event_type": event_type, "since": since,
                       "until": until, "q": q}

    def clauses(self) -> list[Any]:
        v = self.values
        out: list[Any] = []
        for name in ("actor", "action", "resource_type", "resource_id", "event_type"):
            if v[name]:
                out.append(getattr(AuditRecord, name) == v[name])
        if v["since"]:
            out.append(AuditRecord.occurred_at >= v["since"])
        if v["until"]:
            out.append(AuditRecord.occurred_at < v["until"])
        if v["q"]:
            needle = f"%{_escape_like(str(v['q']).lower())}%"
            out.append(func.lower(cast(AuditRecord.details, String)).like(needle, escape="\\"))
        return out

    def as_strings(self) -> dict[str, str]:
        return {k: (v.isoformat() if isinstance(v, datetime) else str(v))
                for k, v in self.values.items() if v}


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class AuditService:
    def __init__(self, db: Database, store: ObjectStore, events: Events) -> None:
        self.db = db
        self.store = store
        self.events = events

    # ---- ingestion -------------------------------------------------------------------------

    async def ingest(self, s: AsyncSession, events: Sequence[EventEnvelope]) -> int:
        """Append events not seen before; one transaction for the batch. Returns how many
        records were written.

        A handful of statements per batch whatever its size: one dedupe query, the heads of
        every chain touched locked in one `SELECT … FOR UPDATE` (a fixed order: no deadlocks
        between replicas), one multi-row insert of the records and one executemany that moves
        the heads. Records are plain Core rows (ORM objects cost more than the database)."""
        unique: dict[str, EventEnvelope] = {}
        for e in events:
            unique.setdefault(e.id, e)
        if not unique:
            return 0
        seen = set((await s.execute(
            select(AuditRecord.event_id).where(AuditRecord.event_id.in_(list(unique)))
        )).scalars())
        by_chain: dict[str, list[EventEnvelope]] = {}
        for e in unique.values():
            if e.id not in seen:
                by_chain.setdefault(chain_of(e.org_id), []).append(e)
        if not by_chain:
            return 0
        heads = await self._lock_heads(s, sorted(by_chain))
        rows: list[dict[str, Any]] = []
        moved: list[dict[str, Any]] = []
        now = utcnow()
        for chain, chain_events in by_chain.items():
            seq, prev = heads[chain]
            for e in chain_events:
                seq += 1
                values = record_values(e, chain=chain, seq=seq, prev_hash=prev)
                rows.append(values)
                prev = values["hash"]
            moved.append({"b_chain": chain, "b_seq": seq, "b_hash": prev, "b_now": now})
        await self._insert_records(s, rows)
        await s.execute(
            update(HEADS).where(HEADS.c.chain == bindparam("b_chain"))
            .values(last_seq=bindparam("b_seq"), last_hash=bindparam("b_hash"),
                    updated_at=bindparam("b_now")),
            moved)
        return len(rows)

    async def _insert_records(self, s: AsyncSession, rows: list[dict[str, Any]]) -> None:
        """PostgreSQL: COPY (binary, several times cheaper than a multi-row INSERT at these
        batch sizes) on the transaction's own connection; SQLite: an executemany insert."""
        if self.db.is_sqlite:
            await s.execute(insert(RECORDS), rows)
            return
        raw = await (await s.connection()).get_raw_connection()
        driver: Any = raw.driver_connection
        await driver.copy_records_to_table(
            RECORDS.name, schema_name=self.db.schema, columns=COPY_COLUMNS,
            records=[tuple(orjson.dumps(r[c]).decode() if c == "details" else r[c]
                           for c in COPY_COLUMNS) for r in rows])

    async def _lock_heads(self, s: AsyncSession, chains: list[str]) -> dict[str, tuple[int, str]]:
        """(last seq, last hash) of each chain, its head row locked for this transaction;
        missing heads are created (concurrently with another replica: ON CONFLICT)."""
        def locked(names: list[str]) -> Any:
            return (select(HEADS.c.chain, HEADS.c.last_seq, HEADS.c.last_hash)
                    .where(HEADS.c.chain.in_(names)).order_by(HEADS.c.chain).with_for_update())

        heads = {c: (q, h) for c, q, h in (await s.execute(locked(chains))).all()}
        missing = [c for c in chains if c not in heads]
        if missing:
            ins: Any = sqlite.insert(HEADS) if self.db.is_sqlite else postgresql.insert(HEADS)
            now = utcnow()
            await s.execute(ins.on_conflict_do_nothing(), [
                dict(chain=c, last_seq=0, last_hash=GENESIS_HASH, anchor_seq=0,
                     anchor_hash=GENESIS_HASH, updated_at=now) for c in missing])
            heads.update({c: (q, h) for c, q, h in (await s.execute(locked(missing))).all()})
        return heads

    async def _lock_head(self, s: AsyncSession, chain: str) -> ChainHead:
        ins: Any = sqlite.insert(ChainHead) if self.db.is_sqlite else postgresql.insert(ChainHead)
        await s.execute(ins.values(chain=chain, last_seq=0, last_hash=GENESIS_HASH,
                                   anchor_seq=0, anchor_hash=GENESIS_HASH, updated_at=utcnow())
                        .on_conflict_do_nothing())
        head = (await s.execute(
            select(ChainHead).where(ChainHead.chain == chain).with_for_update()
        )).scalar_one()
        return head

    # ---- reading ---------------------------------------------------------------------------

    def _scoped(self, p: Principal) -> Any:
        return select(AuditRecord).where(AuditRecord.chain == str(p.org_id))

    async def search(self, s: AsyncSession, p: Principal, filters: Filters, *, limit: int,
                     cursor: str | None) -> tuple[list[AuditRecord], str | None]:
        """Newest first; `cursor` is the last id of the previous page."""
        stmt = self._scoped(p).where(*filters.clauses())
        if cursor:
            try:
                stmt = stmt.where(AuditRecord.id < uuid.UUID(cursor))
            except ValueError as exc:
                raise BadRequest("cursor is not valid; pass back next_cursor",
                                 code="invalid_cursor") from exc
        rows = list((await s.execute(
            stmt.order_by(AuditRecord.id.desc()).limit(limit + 1))).scalars())
        nxt = str(rows[limit - 1].id) if len(rows) > limit else None
        return rows[:limit], nxt

    async def get(self, s: AsyncSession, p: Principal, record_id: uuid.UUID) -> AuditRecord:
        row = (await s.execute(self._scoped(p).where(AuditRecord.id == record_id))
               ).scalar_one_or_none()
        if row is None:
            raise NotFound(f"audit record {record_id} does not exist")
        return row

    async def export(self, p: Principal, filters: Filters, fmt: str) -> AsyncIterator[bytes]:
        """Stream matching records oldest first, a batch at a time in short transactions:
        memory stays flat however many records there are."""
        if fmt == "csv":
            yield _csv_line(CSV_COLUMNS)
        after: int | None = None
        while True:
            async with self.db.transaction() as s:
                stmt = self._scoped(p).where(*filters.clauses())
                if after is not None:
                    stmt = stmt.where(AuditRecord.seq > after)
                rows = list((await s.execute(
                    stmt.order_by(AuditRecord.seq).limit(EXPORT_BATCH))).scalars())
            if not rows:
                return
            after = rows[-1].seq
            chunk = io.BytesIO()
            for r in rows:
                row = record_view(r)
                if fmt == "csv":
                    chunk.write(_csv_line([
                        _csv_value(row[c]) for c in CSV_COLUMNS]))
                else:
                    chunk.write(orjson.dumps(row) + b"\n")
            yield chunk.getvalue()

    async def verify(self, s: AsyncSession, chain: str) -> dict[str, Any]:
        """Re-walk the chain from its anchor; report the first record that does not hold."""
        head = (await s.execute(select(ChainHead).where(ChainHead.chain == chain))
                ).scalar_one_or_none()
        if head is None:
            return {"ok": True, "checked": 0, "first_broken": None, "last_seq": 0,
                    "anchor_seq": 0}
        prev, expected, checked = head.anchor_hash, head.anchor_seq + 1, 0
        while True:
            rows = list((await s.execute(
                # Bounded by the head read above: records appended meanwhile are for the
                # next verify, not a "missing tail" of this one.
                select(AuditRecord).where(AuditRecord.chain == chain,
                                          AuditRecord.seq >= expected,
                                          AuditRecord.seq <= head.last_seq)
                .order_by(AuditRecord.seq).limit(EXPORT_BATCH))).scalars())
            if not rows:
                break
            for r in rows:
                problem = None
                if r.seq != expected:
                    problem = f"records {expected}…{r.seq - 1} are missing before this one"
                elif r.prev_hash != prev:
                    problem = "its prev_hash does not match the record before it"
                elif record_hash(r) != r.hash:
                    problem = "its content does not match its hash (the record was changed)"
                if problem:
                    return {"ok": False, "checked": checked, "last_seq": head.last_seq,
                            "anchor_seq": head.anchor_seq,
                            "first_broken": {"id": str(r.id), "seq": r.seq, "reason": problem}}
                prev, expected, checked = r.hash, expected + 1, checked + 1
        if expected - 1 != head.last_seq or prev != head.last_hash:
            return {"ok": False, "checked": checked, "last_seq": head.last_seq,
                    "anchor_seq": head.anchor_seq,
                    "first_broken": {"id": None, "seq": expected,
                                     "reason": "records at the end of the chain are missing"}}
        return {"ok": True, "checked": checked, "first_broken": None,
                "last_seq": head.last_seq, "anchor_seq": head.anchor_seq}

    async def summary(self, s: AsyncSession, p: Principal, since: datetime,
                      until: datetime) -> dict[str, Any]:
        base = [AuditRecord.chain == str(p.org_id), AuditRecord.occurred_at >= since,
                AuditRecord.occurred_at < until]

        async def grouped(col: Any, limit: int | None = None) -> dict[str, int]:
            stmt = (select(col, func.count()).where(*base).group_by(col)
                    .order_by(func.count().desc()))
            if limit:
                stmt = stmt.limit(limit)
            return {str(k): int(n) for k, n in (await s.execute(stmt)).all()}

        async def count(*extra: Any) -> int:
            stmt = select(func.count()).select_from(AuditRecord).where(*base, *extra)
            return int((await s.execute(stmt)).scalar_one())

        return {
            "since": since, "until": until,
            "total": await count(),
            "by_action": await grouped(AuditRecord.action),
            "by_actor": await grouped(AuditRecord.actor, limit=50),
            "failed_logins": await count(AuditRecord.action == "login_failed"),
            "permission_denials": await count(AuditRecord.status == 403),
            "data_exports": await count(or_(AuditRecord.action == "export",
                                            AuditRecord.event_type.like("%.export.created"))),
        }

    # ---- retention -------------------------------------------------------------------------

    async def set_retention(self, s: AsyncSession, p: Principal, days: int) -> RetentionPolicy:
        policy = await s.get(RetentionPolicy, p.org_id)
        if policy is None:
            policy = RetentionPolicy(org_id=p.org_id, days=days)
            s.add(policy)
        policy.days = days
        await s.flush()
        return policy

    async def get_retention(self, s: AsyncSession, p: Principal) -> RetentionPolicy | None:
        return await s.get(RetentionPolicy, p.org_id)

    async def apply_policy(self, org_id: uuid.UUID, *, actor: str) -> Archive | None:
        """Apply the org's retention policy now (its own transactions: on SQLite a request
        transaction would hold the write lock the archiving needs)."""
        async with self.db.transaction() as s:
            policy = await s.get(RetentionPolicy, org_id)
            days = policy.days if policy is not None else None
        if days is None:
            raise Conflict("no retention policy is set; PUT /api/v1/audit/retention first",
                           code="no_retention_policy")
        return await self.apply_retention(org_id, days, actor=actor)

    async def apply_retention(self, org_id: uuid.UUID, days: int, *, actor: str = "system",
                              now: datetime | None = None) -> Archive | None:
        """Archive the chain's records recorded before the cutoff (a prefix of the chain) as
        gzipped JSON Lines in the object store, then delete them and move the anchor. The
        object is written before the database changes, so a failure loses nothing."""
        chain = str(org_id)
        cutoff = (now or utcnow()) - timedelta(days=days)
        async with self.db.transaction() as s:
            head = await self._lock_head(s, chain)
            last = (await s.execute(
                select(func.max(AuditRecord.seq)).where(
                    AuditRecord.chain == chain, AuditRecord.recorded_at < cutoff)
            )).scalar_one_or_none()
            if not last or last <= head.anchor_seq:
                return None
            rows = list((await s.execute(
                select(AuditRecord).where(AuditRecord.chain == chain,
                                          AuditRecord.seq > head.anchor_seq,
                                          AuditRecord.seq <= last)
                .order_by(AuditRecord.seq))).scalars())
            buf = io.BytesIO()
            with gzip.GzipFile(fileobj=buf, mode="wb") as gz:
                for r in rows:
                    gz.write(orjson.dumps({**canonical(r), "hash": r.hash,
                                           "recorded_at": r.recorded_at.isoformat()}) + b"\n")
            first, final = rows[0], rows[-1]
            key = f"audit/{chain}/{first.seq:012d}-{final.seq:012d}.jsonl.gz"
            info = await self.store.put_bytes(key, buf.getvalue(), content_type="application/gzip")
            archive = Archive(org_id=org_id, chain=chain, from_seq=first.seq, to_seq=final.seq,
                              records=len(rows), object_key=key, sha256=info.sha256 or "",
                              first_prev_hash=first.prev_hash, last_hash=final.hash)
            s.add(archive)
            await s.execute(delete(AuditRecord).where(
                AuditRecord.chain == chain, AuditRecord.seq <= final.seq))
            head.anchor_seq, head.anchor_hash = final.seq, final.hash
            policy = await s.get(RetentionPolicy, org_id)
            if policy is not None:
                policy.last_run_at = utcnow()
            await s.flush()
            await self.events.records_archived(s, org_id, archive, actor)
            return archive

    async def list_archives(self, s: AsyncSession, p: Principal) -> list[Archive]:
        return list((await s.execute(
            select(Archive).where(Archive.org_id == p.org_id).order_by(Archive.from_seq)
        )).scalars())

    async def due_policies(self) -> list[RetentionPolicy]:
        async with self.db.transaction() as s:
            return list((await s.execute(select(RetentionPolicy))).scalars())


def record_view(r: AuditRecord) -> dict[str, Any]:
    return {"id": str(r.id), "org_id": str(r.org_id) if r.org_id else None, "seq": r.seq,
            "occurred_at": _utc(r.occurred_at), "recorded_at": _utc(r.recorded_at),
            "action": r.action, "actor": r.actor, "resource_type": r.resource_type,
            "resource_id": r.resource_id, "event_type": r.event_type, "event_id": r.event_id,
            "status": r.status, "ip": r.ip, "request_id": r.request_id,
            "trace_id": r.trace_id, "details": r.details, "prev_hash": r.prev_hash,
            "hash": r.hash}


def _utc(dt: datetime) -> str:
    """RFC 3339 with `Z`, as the JSON API writes it."""
    return dt.isoformat().replace("+00:00", "Z")


def _csv_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, dict | list):
        return orjson.dumps(v).decode()
    return str(v)


def _csv_line(values: Sequence[str]) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(values)
    return out.getvalue().encode()
