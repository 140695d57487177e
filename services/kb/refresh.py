"""Scheduled re-ingestion: knowledge bases with a daily or weekly update strategy re-import, when
due, every document that came from a dataset and follows its latest version; a document whose
dataset gained a new version is queued again (its old chunks answer until the new ones are
indexed). `POST /api/v1/kb/{id}/refresh` runs the same pass at once."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid

import anyio.to_thread
from sqlalchemy import select

from services.kb.models import Document, KnowledgeBase
from services.kb.service import KbService
from workbench.db import utcnow
from workbench.identity.principal import Principal, Role

log = logging.getLogger("services.kb.refresh")


class Refresher:
    def __init__(self, service: KbService) -> None:
        self.service = service

    async def refresh(self, org_id: uuid.UUID, kb_id: uuid.UUID, *, actor: str = "system"
                      ) -> tuple[int, int, int]:
        """(queued, unchanged, failed) over the knowledge base's dataset documents."""
        service = self.service
        async with service.db.transaction() as s:
            kb = await s.get(KnowledgeBase, kb_id)
            if kb is None or kb.org_id != org_id:
                return 0, 0, 0
            docs = [d for d in (await s.execute(select(Document).where(
                Document.kb_id == kb.id, Document.org_id == org_id))).scalars()
                if (d.source or {}).get("type") in ("dataset", "refresh")
                and (d.source or {}).get("follow_latest")]
            for d in docs:
                s.expunge(d)
        queued = unchanged = failed = 0
        system = Principal.build(user_id=uuid.UUID(int=0), org_id=org_id, role=Role.ADMIN)
        for d in docs:
            try:
                info, data = await service.upstream.dataset_file(
                    org_id, uuid.UUID(d.source["dataset_id"]), None,
                    service.settings.kb_max_document_bytes, unless_sha256=d.sha256)
                if data is None:
                    unchanged += 1
                    continue
                sha256 = await anyio.to_thread.run_sync(_sha256, data)
                if sha256 == d.sha256:
                    unchanged += 1
                    continue
                key = service.staging_key(org_id, kb_id)
                await service.store.put_bytes(key, data)
                async with service.db.transaction() as s:
                    kb_row = await s.get(KnowledgeBase, kb_id)
                    assert kb_row is not None
                    _, was_queued = await service.add_document(
                        s, system, kb_row, name=d.name, object_key=key, size=len(data),
                        sha256=sha256, content_type=d.content_type, fmt=d.format or "txt",
                        meta=None, source={**d.source, "type": "refresh",
                                           "version": int(info["number"])})
                queued += int(was_queued)
            except Exception as exc:
                failed += 1
                log.warning("refreshing %s of knowledge base %s failed: %s", d.name, kb_id, exc)
        async with service.db.transaction() as s:
            kb_row = await s.get(KnowledgeBase, kb_id)
            if kb_row is not None:
                await service.mark_refreshed(s, kb_row, utcnow())
                await service.events.refresh_ran(s, kb_row, queued, unchanged, failed, actor)
        return queued, unchanged, failed

    async def run(self) -> None:
        """Every kb_refresh_check_s: refresh the knowledge bases that are due."""
        while True:
            await asyncio.sleep(self.service.settings.kb_refresh_check_s)
            try:
                for org_id, kb_id in await self.service.due_refreshes():
                    await self.refresh(org_id, kb_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("scheduled refresh failed: %s", exc)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
