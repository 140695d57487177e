"""Label tasks: classify the rows of one dataset version with labels from a fixed set, with an
assignee and a status, and export the labelled rows as a new, derived version (the source's
columns plus `label`)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from services.data.models import Annotation, AnnotationTask, DatasetVersion
from services.data.service import DataService, NewVersion, require_not_zip
from services.data.transforms import Transforms, _write_transformed
from workbench.db import utcnow
from workbench.errors import Conflict, NotFound, ValidationFailed
from workbench.identity.principal import Principal
from workbench.repository import Repository

STATUSES = ("pending", "in_progress", "completed")


class TaskRepo(Repository[AnnotationTask]):
    model = AnnotationTask
    noun = "annotation task"


class Annotations:
    def __init__(self, service: DataService, transforms: Transforms) -> None:
        self.service = service
        self.transforms = transforms
        self.db = service.db

    async def create_task(self, s: AsyncSession, p: Principal, dataset_id: uuid.UUID, *,
                          version: int | None, name: str, labels: list[str],
                          instructions: str, assignee_id: uuid.UUID | None) -> AnnotationTask:
        d = await self.service.get_dataset(s, p, dataset_id)
        if d.latest_version == 0:
            raise Conflict("the dataset has no version to label yet; upload one first",
                           code="no_version")
        v = await self.service.get_version(s, p, dataset_id, version or d.latest_version)
        require_not_zip(v, "labelling")
        if len(set(labels)) != len(labels):
            raise ValidationFailed("labels must be distinct", extra={"field": "labels"})
        t = AnnotationTask(org_id=p.org_id, dataset_id=d.id, version_id=v.id, name=name,
                           labels=labels, instructions=instructions, assignee_id=assignee_id,
                           total_rows=v.row_count, created_by=p.actor)
        await TaskRepo(s, p.org_id).add(t)
        await self.service.events.annotation_task_created(s, t, p.actor)
        return t

    async def list_tasks(self, s: AsyncSession, p: Principal, dataset_id: uuid.UUID, *,
                         status: str | None, assignee_id: uuid.UUID | None, limit: int,
                         cursor: str | None) -> tuple[list[AnnotationTask], str | None]:
        await self.service.get_dataset(s, p, dataset_id)
        where: list[Any] = [AnnotationTask.dataset_id == dataset_id]
        if status:
            where.append(AnnotationTask.status == status)
        if assignee_id:
            where.append(AnnotationTask.assignee_id == assignee_id)
        return await TaskRepo(s, p.org_id).list(limit=limit, cursor=cursor, where=where)

    async def get_task(self, s: AsyncSession, p: Principal, dataset_id: uuid.UUID,
                       task_id: uuid.UUID, *, lock: bool = False) -> AnnotationTask:
        await self.service.get_dataset(s, p, dataset_id)
        stmt = TaskRepo(s, p.org_id).scoped().where(AnnotationTask.id == task_id,
                                                    AnnotationTask.dataset_id == dataset_id)
        if lock:
            stmt = stmt.with_for_update()
        t = (await s.execute(stmt)).scalar_one_or_none()
        if t is None:
            raise NotFound(f"annotation task {task_id} does not exist")
        return t

    async def update_task(self, s: AsyncSession, p: Principal, dataset_id: uuid.UUID,
                          task_id: uuid.UUID, changes: dict[str, Any]) -> AnnotationTask:
        t = await self.get_task(s, p, dataset_id, task_id, lock=True)
        changed = [k for k, v in changes.items() if getattr(t, k) != v]
        for k in changed:
            setattr(t, k, changes[k])
        if "status" in changed:
            t.completed_at = utcnow() if t.status == "completed" else None
        await s.flush()
        if changed:
            await self.service.events.annotation_task_updated(s, t, changed, p.actor)
        return t

    async def set_labels(self, s: AsyncSession, p: Principal, dataset_id: uuid.UUID,
                         task_id: uuid.UUID, items: list[tuple[int, str]]) -> AnnotationTask:
        t = await self.get_task(s, p, dataset_id, task_id, lock=True)
        if t.status == "completed":
            raise Conflict("the task is completed; reopen it (status in_progress) to change "
                           "labels", code="task_completed")
        allowed = set(t.labels)
        for i, (row, label) in enumerate(items):
            if label not in allowed:
                raise ValidationFailed(f"items[{i}]: {label!r} is not one of the task's labels "
                                       f"({', '.join(t.labels)})",
                                       extra={"field": f"items[{i}].label"})
            if not 0 <= row < t.total_rows:
                raise ValidationFailed(f"items[{i}]: row {row} is outside the version's rows "
                                       f"0…{t.total_rows - 1}",
                                       extra={"field": f"items[{i}].row"})
        latest = dict(items)  # the same row twice: the last label wins
        ins: Any = sqlite.insert(Annotation) if self.db.is_sqlite else postgresql.insert(
            Annotation)
        now = utcnow()
        stmt = ins.values([{"task_id": t.id, "row": row, "org_id": p.org_id, "label": label,
                            "annotator": p.actor, "updated_at": now}
                           for row, label in latest.items()])
        await s.execute(stmt.on_conflict_do_update(
            index_elements=["task_id", "row"],
            set_={"label": stmt.excluded.label, "annotator": stmt.excluded.annotator,
                  "updated_at": stmt.excluded.updated_at}))
        t.labelled_rows = int((await s.execute(select(func.count()).select_from(Annotation)
                                               .where(Annotation.task_id == t.id))).scalar_one())
        if t.status == "pending":
            t.status = "in_progress"
        await s.flush()
        await self.service.events.annotations_labelled(s, t, len(latest), p.actor)
        return t

    async def list_labels(self, s: AsyncSession, p: Principal, dataset_id: uuid.UUID,
                          task_id: uuid.UUID, *, after_row: int | None,
                          limit: int) -> tuple[list[Annotation], int | None]:
        t = await self.get_task(s, p, dataset_id, task_id)
        stmt = select(Annotation).where(Annotation.task_id == t.id,
                                        Annotation.org_id == p.org_id)
        if after_row is not None:
            stmt = stmt.where(Annotation.row > after_row)
        rows = list((await s.execute(stmt.order_by(Annotation.row).limit(limit + 1))).scalars())
        nxt = rows[limit - 1].row if len(rows) > limit else None
        return rows[:limit], nxt

    async def export(self, p: Principal, dataset_id: uuid.UUID, task_id: uuid.UUID, *,
                     only_labelled: bool, note: str) -> DatasetVersion:
        """A new version of the dataset: the task's source rows with a `label` column (null
        where a row has none, or only the labelled rows)."""
        async with self.db.transaction() as s:
            t = await self.get_task(s, p, dataset_id, task_id)
            source = (await s.execute(select(DatasetVersion).where(
                DatasetVersion.id == t.version_id, DatasetVersion.org_id == p.org_id))
            ).scalar_one()
            labels = dict((await s.execute(select(Annotation.row, Annotation.label).where(
                Annotation.task_id == t.id))).all())
        if not labels:
            raise Conflict("nothing is labelled yet", code="nothing_labelled")
        if "label" in {c["name"] for c in source.schema}:
            raise Conflict("the source version already has a `label` column",
                           code="label_column_exists")
        out = self.service._tmp_path("labelled")
        start = [0]

        def add_labels(batch: pa.RecordBatch) -> pa.RecordBatch:
            first = start[0]
            start[0] += batch.num_rows
            column = pa.array([labels.get(first + i) for i in range(batch.num_rows)],
                              type=pa.string())
            labelled = batch.append_column("label", column)
            if only_labelled:
                keep = pa.array([first + i in labels for i in range(batch.num_rows)])
                labelled = labelled.filter(keep)
            return labelled

        def run(path: Path) -> tuple[int, str]:
            return _write_transformed(path, source.format, out, add_labels)

        try:
            size, digest = await self.transforms._on_rows(source, run)
            return await self.service.add_version(p, dataset_id, NewVersion(
                path=out, size=size, sha256=digest, filename=source.filename,
                declared_format=source.format,
                note=note or f"labels of task {t.name!r} on v{source.number}",
                parents=[source.id], transform={
                    "type": "annotate", "task_id": str(t.id), "labelled_rows": len(labels),
                    "only_labelled": only_labelled, "source_version": source.number}))
        finally:
            out.unlink(missing_ok=True)
