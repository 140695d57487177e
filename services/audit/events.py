"""Events the audit service publishes (proto/wb/audit/v1/events.proto), and the consumer that
turns every platform event into an audit record."""

from __future__ import annotations

import uuid

from sqlalchemy.ext.asyncio import AsyncSession

from services.audit.models import EVENT_TABLES, Archive
from workbench.events.outbox import Outbox
from workbench.identity.principal import Principal

CONSUMER = "audit"
SUBJECT = "wb.>"


class Events:
    def __init__(self) -> None:
        self.outbox = Outbox(EVENT_TABLES, source="wb/audit")

    async def export_created(self, s: AsyncSession, p: Principal, fmt: str,
                             filters: dict[str, str]) -> None:
        await self.outbox.record(s, "wb.audit.export.created",
                                 {"format": fmt, "filters": filters},
                                 org_id=str(p.org_id), actor=p.actor)

    async def retention_updated(self, s: AsyncSession, p: Principal, days: int) -> None:
        await self.outbox.record(s, "wb.audit.retention_policy.updated",
                                 {"org_id": str(p.org_id), "days": days},
                                 org_id=str(p.org_id), actor=p.actor, subject=str(p.org_id))

    async def records_archived(self, s: AsyncSession, org_id: uuid.UUID, archive: Archive,
                               actor: str) -> None:
        await self.outbox.record(s, "wb.audit.records.archived", {
            "org_id": str(org_id), "archive_id": str(archive.id),
            "object_key": archive.object_key, "records": archive.records,
            "from_seq": archive.from_seq, "to_seq": archive.to_seq,
        }, org_id=str(org_id), actor=actor, subject=str(archive.id))
