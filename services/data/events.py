"""Events the data service publishes (proto/wb/data/v1/events.proto), written to the outbox in
the transaction of the change they announce."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from services.data.models import EVENT_TABLES, AnnotationTask, Dataset, DatasetVersion, Upload
from workbench.events.outbox import Outbox


class Events:
    def __init__(self) -> None:
        self.outbox = Outbox(EVENT_TABLES, source="wb/data")

    async def _record(self, s: AsyncSession, type_: str, data: dict[str, object], *,
                      org_id: object, actor: str, subject: object) -> None:
        await self.outbox.record(s, type_, data, org_id=str(org_id), actor=actor,
                                 subject=str(subject))

    async def dataset_created(self, s: AsyncSession, d: Dataset, actor: str) -> None:
        await self._record(s, "wb.data.dataset.created", {
            "dataset_id": str(d.id), "project_id": str(d.project_id), "name": d.name,
            "sensitive": d.sensitive}, org_id=d.org_id, actor=actor, subject=d.id)

    async def dataset_updated(self, s: AsyncSession, d: Dataset, changed: list[str],
                              actor: str) -> None:
        await self._record(s, "wb.data.dataset.updated", {
            "dataset_id": str(d.id), "changed": changed},
            org_id=d.org_id, actor=actor, subject=d.id)

    async def dataset_deleted(self, s: AsyncSession, d: Dataset, actor: str) -> None:
        await self._record(s, "wb.data.dataset.deleted", {
            "dataset_id": str(d.id),
            "purge_after": d.purge_after.isoformat() if d.purge_after else ""},
            org_id=d.org_id, actor=actor, subject=d.id)

    async def dataset_restored(self, s: AsyncSession, d: Dataset, actor: str) -> None:
        await self._record(s, "wb.data.dataset.restored", {"dataset_id": str(d.id)},
                           org_id=d.org_id, actor=actor, subject=d.id)

    async def dataset_purged(self, s: AsyncSession, d: Dataset, versions: int, size: int,
                             actor: str) -> None:
        await self._record(s, "wb.data.dataset.purged", {
            "dataset_id": str(d.id), "versions": versions, "bytes": size},
            org_id=d.org_id, actor=actor, subject=d.id)

    async def version_created(self, s: AsyncSession, v: DatasetVersion, actor: str) -> None:
        await self._record(s, "wb.data.version.created", {
            "dataset_id": str(v.dataset_id), "version_id": str(v.id), "number": v.number,
            "format": v.format, "size_bytes": v.size_bytes, "sha256": v.sha256,
            "row_count": v.row_count, "parents": list(v.parents),
            "transform": str(v.transform.get("type", "upload")), "encrypted": v.encrypted},
            org_id=v.org_id, actor=actor, subject=v.id)

    async def version_downloaded(self, s: AsyncSession, v: DatasetVersion, range_: str,
                                 actor: str) -> None:
        await self._record(s, "wb.data.version.downloaded", {
            "dataset_id": str(v.dataset_id), "version_id": str(v.id), "number": v.number,
            "range": range_}, org_id=v.org_id, actor=actor, subject=v.id)

    async def upload_started(self, s: AsyncSession, u: Upload, actor: str) -> None:
        await self._record(s, "wb.data.upload.started", {
            "upload_id": str(u.id), "dataset_id": str(u.dataset_id), "filename": u.filename,
            "size": u.size}, org_id=u.org_id, actor=actor, subject=u.id)

    async def upload_aborted(self, s: AsyncSession, u: Upload, reason: str, actor: str) -> None:
        await self._record(s, "wb.data.upload.aborted", {
            "upload_id": str(u.id), "dataset_id": str(u.dataset_id), "reason": reason,
            "received": u.received}, org_id=u.org_id, actor=actor, subject=u.id)

    async def pii_scan_completed(self, s: AsyncSession, v: DatasetVersion, rows: int,
                                 totals: dict[str, int], actor: str) -> None:
        await self._record(s, "wb.data.pii_scan.completed", {
            "dataset_id": str(v.dataset_id), "version_id": str(v.id), "rows_scanned": rows,
            "findings": totals}, org_id=v.org_id, actor=actor, subject=v.id)

    async def annotation_task_created(self, s: AsyncSession, t: AnnotationTask,
                                      actor: str) -> None:
        await self._record(s, "wb.data.annotation_task.created", {
            "task_id": str(t.id), "dataset_id": str(t.dataset_id),
            "version_id": str(t.version_id), "name": t.name, "labels": list(t.labels),
            "assignee_id": str(t.assignee_id) if t.assignee_id else ""},
            org_id=t.org_id, actor=actor, subject=t.id)

    async def annotation_task_updated(self, s: AsyncSession, t: AnnotationTask,
                                      changed: list[str], actor: str) -> None:
        await self._record(s, "wb.data.annotation_task.updated", {
            "task_id": str(t.id), "dataset_id": str(t.dataset_id), "changed": changed,
            "status": t.status}, org_id=t.org_id, actor=actor, subject=t.id)

    async def annotations_labelled(self, s: AsyncSession, t: AnnotationTask, rows: int,
                                   actor: str) -> None:
        await self._record(s, "wb.data.annotations.labelled", {
            "task_id": str(t.id), "dataset_id": str(t.dataset_id), "rows": rows,
            "labelled_total": t.labelled_rows}, org_id=t.org_id, actor=actor, subject=t.id)
