"""The data domain: datasets in projects, immutable versions made from received files (checked,
analysed, stored — encrypted when sensitive — and charged to the org's storage quota), lineage,
soft delete and purge. Functions take a session and a principal; they flush, never commit —
except the version pipeline and the purge, which must not hold a transaction while files move
and so run their own short ones."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from sqlalchemy import delete, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from services.data import formats
from services.data.blobs import Blobs
from services.data.events import Events
from services.data.models import Dataset, DatasetVersion, Upload, VersionParent
from services.data.settings import DataSettings
from services.data.upstream import UserDirectory
from workbench.db import Database, utcnow, uuid7
from workbench.errors import BadRequest, Conflict, NotFound, ValidationFailed
from workbench.identity.principal import Principal
from workbench.repository import Repository

# Analysis and transforms are CPU and memory heavy: a few at a time per process.
ANALYSIS_SLOTS = anyio.CapacityLimiter(2)
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
log = logging.getLogger("services.data")


class DatasetRepo(Repository[Dataset]):
    model = Dataset
    noun = "dataset"


class VersionRepo(Repository[DatasetVersion]):
    model = DatasetVersion
    noun = "dataset version"


@dataclass
class NewVersion:
    """A file on local disk that is to become the next version of a dataset."""

    path: Path
    size: int
    sha256: str
    filename: str
    declared_format: str | None = None
    note: str = ""
    parents: list[uuid.UUID] = field(default_factory=list)
    transform: dict[str, Any] = field(default_factory=dict)
    # Storage quota already reserved for it (an upload reserves its Content-Length up front).
    reserved: int = 0


def safe_filename(name: str | None, fmt: str | None = None) -> str:
    """The last path segment, reduced to safe characters (it becomes part of an object key and
    of a Content-Disposition header)."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = _SAFE_NAME.sub("_", base).strip("._")[:120]
    return base or f"data.{fmt or 'bin'}"


def format_problem(exc: formats.FormatError, filename: str) -> ValidationFailed:
    return ValidationFailed(f"{filename}: {exc.message}", code=exc.code,
                            extra={"location": exc.location, "filename": filename})


class DataService:
    def __init__(self, settings: DataSettings, db: Database, blobs: Blobs,
                 users: UserDirectory, events: Events) -> None:
        self.settings = settings
        self.db = db
        self.blobs = blobs
        self.users = users
        self.events = events

    # ---- datasets --------------------------------------------------------------------------

    async def create_dataset(self, s: AsyncSession, p: Principal, *, project_id: uuid.UUID,
                             name: str, description: str, tags: list[str],
                             sensitive: bool) -> Dataset:
        await self.users.check_project(p.org_id, project_id)
        await self._check_name_free(s, p, project_id, name)
        d = Dataset(org_id=p.org_id, project_id=project_id, owner_id=p.user_id, name=name,
                    description=description, tags=tags, sensitive=sensitive)
        await DatasetRepo(s, p.org_id).add(d)
        await self.events.dataset_created(s, d, p.actor)
        return d

    async def _check_name_free(self, s: AsyncSession, p: Principal, project_id: uuid.UUID,
                               name: str, *, other_than: uuid.UUID | None = None) -> None:
        stmt = DatasetRepo(s, p.org_id).scoped().where(
            Dataset.project_id == project_id, Dataset.name == name,
            Dataset.deleted_at.is_(None))
        if other_than is not None:
            stmt = stmt.where(Dataset.id != other_than)
        if (await s.execute(stmt)).first() is not None:
            raise Conflict(f"the project already has a dataset named {name!r}",
                           code="name_taken", extra={"field": "name"})

    async def list_datasets(self, s: AsyncSession, p: Principal, *,
                            project_id: uuid.UUID | None, q: str | None, tag: str | None,
                            fmt: str | None, deleted: bool, limit: int,
                            cursor: str | None) -> tuple[list[Dataset], str | None]:
        where: list[Any] = [Dataset.deleted_at.is_not(None) if deleted
                            else Dataset.deleted_at.is_(None)]
        if project_id is not None:
            where.append(Dataset.project_id == project_id)
        if q:
            needle = f"%{q.lower()}%"
            where.append(or_(func.lower(Dataset.name).like(needle),
                             func.lower(Dataset.description).like(needle)))
        if fmt:
            where.append(Dataset.format == fmt)
        rows, nxt = await DatasetRepo(s, p.org_id).list(limit=limit if not tag else 1000,
                                                         cursor=cursor, where=where)
        if tag:  # tags are a JSON list: filtered here, the page cut after
            rows = [d for d in rows if tag in (d.tags or [])]
            nxt = str(rows[limit - 1].id) if len(rows) > limit else None
            rows = rows[:limit]
        return rows, nxt

    async def get_dataset(self, s: AsyncSession, p: Principal, dataset_id: uuid.UUID, *,
                          deleted_ok: bool = False, lock: bool = False) -> Dataset:
        stmt = DatasetRepo(s, p.org_id).scoped().where(Dataset.id == dataset_id)
        if lock:
            stmt = stmt.with_for_update()
        d = (await s.execute(stmt)).scalar_one_or_none()
        if d is None or (d.deleted_at is not None and not deleted_ok):
            raise NotFound(f"dataset {dataset_id} does not exist")
        return d

    async def update_dataset(self, s: AsyncSession, p: Principal, dataset_id: uuid.UUID,
                             changes: dict[str, Any]) -> Dataset:
        d = await self.get_dataset(s, p, dataset_id, lock=True)
        if "name" in changes and changes["name"] != d.name:
            await self._check_name_free(s, p, d.project_id, changes["name"], other_than=d.id)
        changed = [k for k, v in changes.items() if getattr(d, k) != v]
        if "sensitive" in changed and not changes["sensitive"] and await self._any_encrypted(
                s, d):
            raise Conflict("this dataset has encrypted versions; a dataset flagged sensitive "
                           "stays sensitive (copy the data to a new dataset instead)",
                           code="sensitive_is_permanent", extra={"field": "sensitive"})
        for k in changed:
            setattr(d, k, changes[k])
        await s.flush()
        if changed:
            await self.events.dataset_updated(s, d, changed, p.actor)
        return d

    async def _any_encrypted(self, s: AsyncSession, d: Dataset) -> bool:
        return (await s.execute(select(DatasetVersion.id).where(
            DatasetVersion.dataset_id == d.id, DatasetVersion.encrypted.is_(True)).limit(1)
        )).first() is not None

    async def encrypt_existing_versions(self, org_id: uuid.UUID, dataset_id: uuid.UUID) -> int:
        """After a dataset is flagged sensitive: re-store each plaintext version encrypted
        (new object first, then the row, then the old object is removed)."""
        async with self.db.transaction() as s:
            versions = list((await s.execute(VersionRepo(s, org_id).scoped().where(
                DatasetVersion.dataset_id == dataset_id,
                DatasetVersion.encrypted.is_(False)))).scalars())
        for v in versions:
            tmp = self._tmp_path("reencrypt")
            try:
                await self.blobs.fetch(v, tmp)
                key = f"{v.object_key}.enc"
                stored = await self.blobs.put(key, tmp, sha256=v.sha256,
                                              content_type=v.content_type, org_id=v.org_id)
            finally:
                tmp.unlink(missing_ok=True)
            async with self.db.transaction() as s:
                row = await VersionRepo(s, org_id).get(v.id)
                old_key = row.object_key
                row.object_key, row.stored_bytes, row.encrypted = key, stored, True
            await self.blobs.delete(old_key)
        return len(versions)

    async def delete_dataset(self, s: AsyncSession, p: Principal, dataset_id: uuid.UUID) -> None:
        d = await self.get_dataset(s, p, dataset_id, lock=True)
        d.deleted_at = utcnow()
        d.purge_after = d.deleted_at + timedelta(days=self.settings.data_purge_after_days)
        await s.flush()
        await self.events.dataset_deleted(s, d, p.actor)

    async def restore_dataset(self, s: AsyncSession, p: Principal,
                              dataset_id: uuid.UUID) -> Dataset:
        d = await self.get_dataset(s, p, dataset_id, deleted_ok=True, lock=True)
        if d.deleted_at is None:
            raise Conflict(f"dataset {dataset_id} is not deleted", code="not_deleted")
        await self._check_name_free(s, p, d.project_id, d.name, other_than=d.id)
        d.deleted_at, d.purge_after = None, None
        await s.flush()
        await self.events.dataset_restored(s, d, p.actor)
        return d

    async def purge_dataset(self, org_id: uuid.UUID, dataset_id: uuid.UUID, *,
                            actor: str) -> None:
        """Remove a soft-deleted dataset for good: its files, its rows, its storage charge.
        Files go first; a failure part-way leaves the dataset deleted and purgeable again."""
        async with self.db.transaction() as s:
            d = (await s.execute(DatasetRepo(s, org_id).scoped().where(
                Dataset.id == dataset_id))).scalar_one_or_none()
            if d is None:
                raise NotFound(f"dataset {dataset_id} does not exist")
            if d.deleted_at is None:
                raise Conflict("delete the dataset before purging it", code="not_deleted")
            keys = list((await s.execute(select(DatasetVersion.object_key).where(
                DatasetVersion.dataset_id == d.id))).scalars())
            uploads = list((await s.execute(select(Upload).where(
                Upload.dataset_id == d.id, Upload.status.in_(("open", "completing")))
            )).scalars())
        for key in keys:
            await self.blobs.delete(key)
        for u in uploads:
            await self.delete_upload_parts(u)
        async with self.db.transaction() as s:
            d = (await s.execute(DatasetRepo(s, org_id).scoped().where(
                Dataset.id == dataset_id).with_for_update())).scalar_one()
            charged = d.size_bytes + sum(u.size for u in uploads)
            await self.events.dataset_purged(s, d, len(keys), d.size_bytes, actor)
            await s.execute(delete(Dataset).where(Dataset.id == d.id))
        await self.users.release_storage(org_id, charged)

    async def datasets_to_encrypt(self) -> list[tuple[uuid.UUID, uuid.UUID]]:
        """Sensitive datasets that still have plaintext versions (an interrupted re-encrypt)."""
        async with self.db.transaction() as s:
            return [(o, i) for o, i in (await s.execute(
                select(Dataset.org_id, Dataset.id).distinct().join(
                    DatasetVersion, DatasetVersion.dataset_id == Dataset.id).where(
                    Dataset.sensitive.is_(True), DatasetVersion.encrypted.is_(False)))).all()]

    async def due_purges(self) -> list[tuple[uuid.UUID, uuid.UUID]]:
        async with self.db.transaction() as s:
            return [(o, i) for o, i in (await s.execute(
                select(Dataset.org_id, Dataset.id).where(
                    Dataset.deleted_at.is_not(None), Dataset.purge_after <= utcnow()))).all()]

    # ---- versions --------------------------------------------------------------------------

    def _tmp_path(self, prefix: str) -> Path:
        folder = self.settings.tmp_dir()
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{prefix}-{uuid.uuid4().hex}"

    async def detect(self, path: Path, filename: str, declared: str | None) -> str:
        try:
            return await anyio.to_thread.run_sync(
                formats.detect_format, path, filename, declared, limiter=ANALYSIS_SLOTS)
        except formats.FormatError as exc:
            raise format_problem(exc, filename) from exc

    async def analyse(self, path: Path, filename: str, fmt: str) -> formats.Analysis:
        limits = formats.ZipLimits(
            max_members=self.settings.data_zip_max_members,
            max_total_uncompressed=self.settings.data_zip_max_uncompressed_bytes)

        def run() -> formats.Analysis:
            return formats.analyze(path, fmt, preview_rows=self.settings.data_preview_rows,
                                   zip_limits=limits,
                                   max_json_bytes=self.settings.data_max_json_bytes)

        try:
            return await anyio.to_thread.run_sync(run, limiter=ANALYSIS_SLOTS)
        except formats.FormatError as exc:
            raise format_problem(exc, filename) from exc

    async def add_version(self, p: Principal, dataset_id: uuid.UUID,
                          new: NewVersion) -> DatasetVersion:
        """Check and analyse the file while it is copied to the object store, then record the
        version: a bad file leaves no object (the copy is removed) and no row; a failed store
        records nothing.

        `new.reserved` bytes of storage quota were reserved by the caller, who gives them back
        if this raises; what the file needs beyond them is reserved (and on failure released)
        here, and on success whatever was reserved beyond the file's size is released."""
        extra = 0
        object_key: str | None = None
        storing: asyncio.Task[int] | None = None
        try:
            async with self.db.transaction() as s:
                d = await self.get_dataset(s, p, dataset_id)
                sensitive = d.sensitive
            if new.size == 0:
                raise ValidationFailed(f"{new.filename}: the file is empty", code="empty_file",
                                       extra={"filename": new.filename})
            fmt = await self.detect(new.path, new.filename, new.declared_format)
            if new.size > new.reserved:
                await self.users.reserve_storage(p.org_id, new.size - new.reserved)
                extra = new.size - new.reserved
            version_id = uuid7()
            filename = safe_filename(new.filename, fmt)
            object_key = f"datasets/{p.org_id}/{dataset_id}/{version_id}/{filename}"
            # The copy into the store and the analysis both only read the file: side by side.
            storing = asyncio.create_task(self.blobs.put(
                object_key, new.path, sha256=new.sha256, content_type=formats.CONTENT_TYPES[fmt],
                org_id=p.org_id if sensitive else None))
            analysis = await self.analyse(new.path, new.filename, fmt)
            stored = await storing
            async with self.db.transaction() as s:
                d = await self.get_dataset(s, p, dataset_id, lock=True)
                if d.sensitive and not sensitive:
                    raise Conflict("the dataset was flagged sensitive during the upload; "
                                   "upload again", code="sensitivity_changed")
                v = DatasetVersion(
                    id=version_id, org_id=p.org_id, dataset_id=d.id,
                    number=d.latest_version + 1, object_key=object_key, filename=filename,
                    format=analysis.format, content_type=analysis.content_type,
                    size_bytes=new.size, stored_bytes=stored, sha256=new.sha256,
                    encrypted=sensitive, schema=analysis.schema, row_count=analysis.row_count,
                    stats=analysis.stats, preview=analysis.preview, members=analysis.members,
                    note=new.note, parents=[str(x) for x in new.parents],
                    transform=new.transform or {"type": "upload"}, created_by=p.actor)
                s.add(v)
                for parent in new.parents:
                    s.add(VersionParent(child_id=version_id, parent_id=parent, org_id=p.org_id))
                d.latest_version = v.number
                d.format, d.row_count, d.status = v.format, v.row_count, "ready"
                d.size_bytes += new.size
                await s.flush()
                await self.events.version_created(s, v, p.actor)
        except BaseException:
            with anyio.CancelScope(shield=True):
                if storing is not None:
                    storing.cancel()
                    await asyncio.wait({storing})
                    if not storing.cancelled():
                        storing.exception()  # retrieved: the error raised is the first one
                if object_key is not None:
                    await _quietly(self.blobs.delete(object_key))
                if extra:
                    await _quietly(self.users.release_storage(p.org_id, extra))
            raise
        if new.reserved > new.size:
            await _quietly(self.users.release_storage(p.org_id, new.reserved - new.size))
        return v

    async def list_versions(self, s: AsyncSession, p: Principal, dataset_id: uuid.UUID, *,
                            limit: int, cursor: str | None
                            ) -> tuple[list[DatasetVersion], str | None]:
        await self.get_dataset(s, p, dataset_id)
        return await VersionRepo(s, p.org_id).list(
            limit=limit, cursor=cursor, where=[DatasetVersion.dataset_id == dataset_id])

    async def get_version(self, s: AsyncSession, p: Principal, dataset_id: uuid.UUID,
                          number: int) -> DatasetVersion:
        await self.get_dataset(s, p, dataset_id)
        v = (await s.execute(VersionRepo(s, p.org_id).scoped().where(
            DatasetVersion.dataset_id == dataset_id, DatasetVersion.number == number)
        )).scalar_one_or_none()
        if v is None:
            raise NotFound(f"dataset {dataset_id} has no version {number}")
        return v

    async def lineage(self, s: AsyncSession, p: Principal,
                      dataset_id: uuid.UUID) -> dict[str, Any]:
        """The graph around the dataset's versions: every ancestor and every descendant, across
        the org's datasets (never beyond the org)."""
        await self.get_dataset(s, p, dataset_id)
        own = set((await s.execute(VersionRepo(s, p.org_id).scoped().with_only_columns(
            DatasetVersion.id).where(DatasetVersion.dataset_id == dataset_id))).scalars())
        edges: set[tuple[uuid.UUID, uuid.UUID]] = set()
        seen = set(own)

        async def walk(frontier: set[uuid.UUID], up: bool) -> None:
            while frontier:
                col = VersionParent.child_id if up else VersionParent.parent_id
                rows = (await s.execute(select(VersionParent.parent_id, VersionParent.child_id)
                                        .where(VersionParent.org_id == p.org_id,
                                               col.in_(list(frontier))))).all()
                nxt: set[uuid.UUID] = set()
                for parent, child in rows:
                    edges.add((parent, child))
                    found = parent if up else child
                    if found not in seen:
                        seen.add(found)
                        nxt.add(found)
                frontier = nxt

        await walk(set(own), up=True)
        await walk(set(own), up=False)
        nodes = list((await s.execute(VersionRepo(s, p.org_id).scoped().where(
            DatasetVersion.id.in_(list(seen))).order_by(DatasetVersion.id))).scalars())
        names = dict((await s.execute(select(Dataset.id, Dataset.name).where(
            Dataset.org_id == p.org_id,
            Dataset.id.in_({v.dataset_id for v in nodes})))).all())
        return {
            "dataset_id": dataset_id,
            "nodes": [{"version_id": v.id, "dataset_id": v.dataset_id,
                       "dataset_name": names.get(v.dataset_id), "number": v.number,
                       "format": v.format, "sha256": v.sha256, "created_at": v.created_at,
                       "transform": v.transform, "note": v.note} for v in nodes],
            "edges": [{"parent": a, "child": b,
                       "transform": next((v.transform for v in nodes if v.id == b), {})}
                      for a, b in sorted(edges)],
        }

    async def record_download(self, p: Principal, v: DatasetVersion, range_: str) -> None:
        async with self.db.transaction() as s:
            await self.events.version_downloaded(s, v, range_, p.actor)

    async def delete_upload_parts(self, u: Upload) -> None:
        for offset, _size in u.parts:
            await self.blobs.delete(part_key(u, offset))


def part_key(u: Upload, offset: int) -> str:
    return f"uploads/{u.org_id}/{u.id}/{offset:016d}"


async def _quietly(work: Awaitable[Any]) -> None:
    """A cleanup step: its failure is logged, never raised over the error being handled."""
    try:
        await work
    except Exception:
        log.warning("cleanup step failed", exc_info=True)


def require_not_zip(v: DatasetVersion, what: str) -> None:
    if v.format == "zip":
        raise BadRequest(f"{what} works on tabular and text versions, not zip archives; "
                         "upload the archive's members as datasets of their own",
                         code="unsupported_for_format")
