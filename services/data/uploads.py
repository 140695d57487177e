"""Resumable uploads: open one with the file's size (its storage is reserved then), send chunks
at the offset received so far (each kept as a part in the object store, so any replica can take
the next one), ask where it stands after a break, complete it into a version, or cancel it.
Unfinished uploads expire."""

from __future__ import annotations

import contextlib
import hashlib
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import anyio
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from services.data.models import DatasetVersion, Upload
from services.data.service import DataService, NewVersion, part_key
from workbench.db import utcnow
from workbench.errors import BadRequest, Conflict, NotFound, PayloadTooLarge, ValidationFailed
from workbench.identity.principal import Principal
from workbench.repository import Repository


class UploadRepo(Repository[Upload]):
    model = Upload
    noun = "upload"


class Uploads:
    def __init__(self, service: DataService) -> None:
        self.service = service
        self.settings = service.settings
        self.db = service.db

    async def start(self, s: AsyncSession, p: Principal, dataset_id: uuid.UUID, *,
                    filename: str, size: int, fmt: str | None, note: str) -> Upload:
        await self.service.get_dataset(s, p, dataset_id)
        if size > self.settings.data_max_upload_bytes:
            raise PayloadTooLarge(
                f"the file is {size:,} bytes; the largest upload is "
                f"{self.settings.data_max_upload_bytes:,} bytes",
                extra={"limit": self.settings.data_max_upload_bytes, "field": "size"})
        if size == 0:
            raise ValidationFailed("the file is empty: there is nothing to upload",
                                   code="empty_file", extra={"field": "size"})
        await self.service.users.reserve_storage(p.org_id, size)
        u = Upload(org_id=p.org_id, dataset_id=dataset_id, filename=filename, size=size,
                   format=fmt, note=note, created_by=p.actor,
                   expires_at=utcnow() + timedelta(seconds=self.settings.data_upload_ttl_s))
        try:
            await UploadRepo(s, p.org_id).add(u)
            await self.service.events.upload_started(s, u, p.actor)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.service.users.release_storage(p.org_id, size)
            raise
        return u

    async def get(self, s: AsyncSession, p: Principal, dataset_id: uuid.UUID,
                  upload_id: uuid.UUID, *, lock: bool = False) -> Upload:
        stmt = UploadRepo(s, p.org_id).scoped().where(Upload.id == upload_id,
                                                      Upload.dataset_id == dataset_id)
        if lock:
            stmt = stmt.with_for_update()
        u = (await s.execute(stmt)).scalar_one_or_none()
        if u is None:
            raise NotFound(f"upload {upload_id} does not exist")
        return u

    def _check_open(self, u: Upload) -> None:
        if u.status != "open":
            raise Conflict(f"upload {u.id} is {u.status}", code=f"upload_{u.status}")
        if u.expires_at <= utcnow():
            raise Conflict(f"upload {u.id} expired; start a new one", code="upload_expired")

    async def put_chunk(self, p: Principal, dataset_id: uuid.UUID, upload_id: uuid.UUID, *,
                        offset: int, body: AsyncIterator[bytes]) -> Upload:
        """Store the chunk as a part, then move the upload's offset — unless another request
        moved it meanwhile (then this part is dropped and the caller told the real offset)."""
        async with self.db.transaction() as s:
            u = await self.get(s, p, dataset_id, upload_id)
            self._check_open(u)
            if offset != u.received:
                raise Conflict(f"this chunk starts at byte {offset:,} but the upload has "
                               f"{u.received:,} bytes; send the chunk that starts there",
                               code="offset_mismatch", extra={"offset": u.received})
            room = min(u.size - u.received, self.settings.data_max_chunk_bytes)
        key = part_key(u, offset)
        info = await self.service.blobs.store.put_stream(
            key, _limited(body, room, u.size - u.received), max_bytes=room)
        if info.size == 0:
            raise BadRequest("the chunk is empty", code="empty_chunk")
        try:
            async with self.db.transaction() as s:
                u = await self.get(s, p, dataset_id, upload_id, lock=True)
                self._check_open(u)
                if u.received != offset:
                    raise Conflict("another chunk arrived for this offset first; ask for the "
                                   "upload's offset and go on from there",
                                   code="offset_mismatch", extra={"offset": u.received})
                u.parts = [*u.parts, [offset, info.size]]
                u.received += info.size
                await s.flush()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.service.blobs.delete(key)
            raise
        return u

    async def complete(self, p: Principal, dataset_id: uuid.UUID, upload_id: uuid.UUID, *,
                       note: str | None) -> DatasetVersion:
        async with self.db.transaction() as s:
            u = await self.get(s, p, dataset_id, upload_id, lock=True)
            self._check_open(u)
            if u.received != u.size:
                raise Conflict(f"the upload is incomplete: {u.received:,} of {u.size:,} bytes "
                               "received", code="upload_incomplete",
                               extra={"offset": u.received, "size": u.size})
            u.status = "completing"
        tmp = self.service._tmp_path("assembled")
        try:
            digest = await self._assemble(u, tmp)
            v = await self.service.add_version(p, dataset_id, NewVersion(
                path=tmp, size=u.size, sha256=digest, filename=u.filename,
                declared_format=u.format, note=u.note if note is None else note,
                reserved=u.size))
        except ValidationFailed:
            # The file is bad: resuming cannot fix it. Its parts and reservation go.
            await self._finish(p, u, status="failed", reason="invalid_file")
            raise
        except BaseException:
            with anyio.CancelScope(shield=True):  # a transient failure: complete again later
                async with self.db.transaction() as s:
                    row = await self.get(s, p, dataset_id, upload_id, lock=True)
                    row.status = "open"
            raise
        finally:
            tmp.unlink(missing_ok=True)
        await self._finish(p, u, status="completed", version_id=v.id, release=False)
        return v

    async def _assemble(self, u: Upload, dest: Path) -> str:
        """The parts, in order, into one local file; returns its SHA-256."""
        digest = hashlib.sha256()
        f = await anyio.open_file(dest, "wb")
        try:
            for offset, _size in sorted(u.parts):
                stream = self.service.blobs.store.get_stream(part_key(u, offset))
                async with contextlib.aclosing(stream):
                    async for chunk in stream:
                        digest.update(chunk)
                        await f.write(chunk)
        finally:
            await f.aclose()
        return digest.hexdigest()

    async def _finish(self, p: Principal | None, u: Upload, *, status: str,
                      reason: str | None = None, version_id: uuid.UUID | None = None,
                      release: bool = True) -> None:
        """Parts removed, reservation released (not when a version took it over), row closed."""
        await self.service.delete_upload_parts(u)
        async with self.db.transaction() as s:
            row = (await s.execute(select(Upload).where(Upload.id == u.id).with_for_update())
                   ).scalar_one()
            row.status, row.version_id, row.parts = status, version_id, []
            if reason is not None:
                await self.service.events.upload_aborted(
                    s, row, reason, p.actor if p is not None else "system")
        if release:
            await self.service.users.release_storage(u.org_id, u.size)

    async def cancel(self, p: Principal, dataset_id: uuid.UUID, upload_id: uuid.UUID) -> None:
        async with self.db.transaction() as s:
            u = await self.get(s, p, dataset_id, upload_id, lock=True)
            if u.status not in ("open",):
                raise Conflict(f"upload {u.id} is {u.status}", code=f"upload_{u.status}")
            u.status = "aborting"
        await self._finish(p, u, status="aborted", reason="cancelled")

    async def expire(self) -> int:
        """Abort open uploads past their expiry (the background sweep)."""
        async with self.db.transaction() as s:
            due = list((await s.execute(select(Upload).where(
                Upload.status == "open", Upload.expires_at <= utcnow()))).scalars())
        for u in due:
            await self._finish(None, u, status="aborted", reason="expired")
        return len(due)


async def _limited(body: AsyncIterator[bytes], room: int, left: int) -> AsyncIterator[bytes]:
    """The chunk's bytes, refusing one that runs past the file's declared size."""
    seen = 0
    async for chunk in body:
        seen += len(chunk)
        if seen > room:
            if room == left:
                raise PayloadTooLarge(f"the chunk runs past the declared file size ({left:,} "
                                      "bytes were left)", code="chunk_past_end")
            raise PayloadTooLarge(f"a chunk may be at most {room:,} bytes",
                                  code="chunk_too_large")
        yield chunk
