"""Events the kb service publishes (proto/wb/kb/v1/events.proto), written to the outbox in the
transaction of the change they announce."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from services.kb.models import EVENT_TABLES, Document, KnowledgeBase
from workbench.events.outbox import Outbox


class Events:
    def __init__(self) -> None:
        self.outbox = Outbox(EVENT_TABLES, source="wb/kb")

    async def _record(self, s: AsyncSession, type_: str, data: dict[str, Any], *,
                      org_id: object, actor: str, subject: object) -> None:
        await self.outbox.record(s, type_, data, org_id=str(org_id), actor=actor,
                                 subject=str(subject))

    async def kb_created(self, s: AsyncSession, kb: KnowledgeBase, actor: str) -> None:
        await self._record(s, "wb.kb.knowledge_base.created", {
            "kb_id": str(kb.id), "project_id": str(kb.project_id), "name": kb.name,
            "embedding_model": kb.embedding_model, "embedding_dim": kb.embedding_dim},
            org_id=kb.org_id, actor=actor, subject=kb.id)

    async def kb_updated(self, s: AsyncSession, kb: KnowledgeBase, changed: list[str],
                         actor: str) -> None:
        await self._record(s, "wb.kb.knowledge_base.updated", {
            "kb_id": str(kb.id), "changed": changed}, org_id=kb.org_id, actor=actor,
            subject=kb.id)

    async def kb_deleted(self, s: AsyncSession, kb: KnowledgeBase, documents: int, chunks: int,
                         actor: str) -> None:
        await self._record(s, "wb.kb.knowledge_base.deleted", {
            "kb_id": str(kb.id), "documents": documents, "chunks": chunks},
            org_id=kb.org_id, actor=actor, subject=kb.id)

    async def document_queued(self, s: AsyncSession, d: Document, reason: str,
                              actor: str) -> None:
        await self._record(s, "wb.kb.document.queued", {
            "kb_id": str(d.kb_id), "document_id": str(d.id), "name": d.name,
            "size_bytes": d.size_bytes, "sha256": d.sha256, "reason": reason,
            "generation": d.generation}, org_id=d.org_id, actor=actor, subject=d.id)

    async def document_progress(self, s: AsyncSession, d: Document) -> None:
        await self._record(s, "wb.kb.document.progress", {
            "kb_id": str(d.kb_id), "document_id": str(d.id), "generation": d.generation,
            "chunks_done": d.chunks_done, "chunks_total": d.chunks_total},
            org_id=d.org_id, actor="system", subject=d.id)

    async def document_indexed(self, s: AsyncSession, d: Document, replaced: int,
                               seconds: float) -> None:
        await self._record(s, "wb.kb.document.indexed", {
            "kb_id": str(d.kb_id), "document_id": str(d.id), "generation": d.generation,
            "chunks": d.chunks_total, "replaced_chunks": replaced, "seconds": seconds},
            org_id=d.org_id, actor="system", subject=d.id)

    async def document_failed(self, s: AsyncSession, d: Document) -> None:
        await self._record(s, "wb.kb.document.failed", {
            "kb_id": str(d.kb_id), "document_id": str(d.id), "generation": d.generation,
            "code": d.error_code, "error": d.error}, org_id=d.org_id, actor="system",
            subject=d.id)

    async def document_deleted(self, s: AsyncSession, d: Document, chunks: int,
                               actor: str) -> None:
        await self._record(s, "wb.kb.document.deleted", {
            "kb_id": str(d.kb_id), "document_id": str(d.id), "chunks": chunks},
            org_id=d.org_id, actor=actor, subject=d.id)

    async def refresh_ran(self, s: AsyncSession, kb: KnowledgeBase, queued: int, unchanged: int,
                          failed: int, actor: str) -> None:
        await self._record(s, "wb.kb.refresh.ran", {
            "kb_id": str(kb.id), "queued": queued, "unchanged": unchanged, "failed": failed},
            org_id=kb.org_id, actor=actor, subject=kb.id)
