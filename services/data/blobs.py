"""Version files in the object store: written from a local file (encrypted with the org's data
key when the dataset is sensitive), read back whole or by byte range (decrypted on the way)."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.to_thread
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite

from services.data import crypto
from services.data.models import DatasetVersion, OrgKey
from workbench.db import Database, utcnow
from workbench.storage import ObjectStore, file_chunks


class Blobs:
    def __init__(self, store: ObjectStore, db: Database, kek: bytes) -> None:
        self.store = store
        self.db = db
        self._kek = kek
        self._keys: dict[uuid.UUID, bytes] = {}

    async def data_key(self, org_id: uuid.UUID) -> bytes:
        """The org's data key, made on first use (two replicas racing: the first row wins)."""
        if org_id in self._keys:
            return self._keys[org_id]
        async with self.db.transaction() as s:
            wrapped = (await s.execute(select(OrgKey.wrapped).where(OrgKey.org_id == org_id))
                       ).scalar_one_or_none()
            if wrapped is None:
                fresh = crypto.wrap_key(self._kek, crypto.new_data_key(), str(org_id))
                ins = (sqlite.insert(OrgKey) if self.db.is_sqlite
                       else postgresql.insert(OrgKey))
                await s.execute(ins.values(org_id=org_id, wrapped=fresh, created_at=utcnow())
                                .on_conflict_do_nothing())
                wrapped = (await s.execute(
                    select(OrgKey.wrapped).where(OrgKey.org_id == org_id))).scalar_one()
        key = crypto.unwrap_key(self._kek, wrapped, str(org_id))
        self._keys[org_id] = key
        return key

    async def mask_salt(self, org_id: uuid.UUID) -> bytes:
        """The org's secret salt for hashed masking: stable, and unknown outside the org."""
        return hmac.new(await self.data_key(org_id), b"wb-data-mask-salt-v1",
                        hashlib.sha256).digest()

    async def put(self, key: str, path: Path, *, sha256: str, content_type: str,
                  org_id: uuid.UUID | None) -> int:
        """Store the file; encrypted under the org's key when `org_id` is given. Returns the
        stored size."""
        if org_id is None:
            info = await self.store.put_file(key, path, content_type=content_type, sha256=sha256)
            return info.size
        dek = await self.data_key(org_id)
        info = await self.store.put_stream(
            key, crypto.encrypt_stream(file_chunks(path), dek),
            content_type="application/octet-stream")
        return info.size

    async def read(self, v: DatasetVersion, start: int = 0,
                   end: int | None = None) -> AsyncIterator[bytes]:
        """Plaintext bytes start..end (inclusive; None: to the end) of the version's file."""
        last = v.size_bytes - 1 if end is None else end
        if v.size_bytes == 0 or last < start:
            return
        if not v.encrypted:
            async for chunk in self.store.get_stream(v.object_key, start=start, end=last):
                yield chunk
            return
        dek = await self.data_key(v.org_id)

        def read(s: int, e: int | None) -> AsyncIterator[bytes]:
            return self.store.get_stream(v.object_key, start=s, end=e)

        async for chunk in crypto.decrypt_range(read, dek, v.stored_bytes, start, last):
            yield chunk

    async def fetch(self, v: DatasetVersion, dest: Path) -> None:
        """The version's plaintext into a local file (for scans and transforms)."""
        f = await anyio.open_file(dest, "wb")
        try:
            stream = self.read(v)
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    await f.write(chunk)
        finally:
            await f.aclose()

    async def delete(self, key: str) -> None:
        await self.store.delete(key)

