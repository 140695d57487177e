"""LocalObjectStore: objects as files in a local folder (embedded mode)."""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import AsyncIterable, AsyncIterator, Callable
from pathlib import Path
from typing import BinaryIO, Unpack

import anyio

from workbench.errors import BadRequest, Conflict, NotFound, ServiceUnavailable
from workbench.storage import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_CONTENT_TYPE,
    ObjectInfo,
    ObjectStore,
    T,
    Ts,
    _byte_range,
    _check_chunk_size,
    _check_range,
    _in_thread,
    _pieces,
    _validate_prefix,
    validate_key,
)


class _LocalUpload:
    """A file being written in the store's temp folder, hashed as it grows."""

    def __init__(self, path: Path, file: BinaryIO) -> None:
        self.path = path
        self.file = file
        self.sha256 = hashlib.sha256()

    @classmethod
    def create(cls, folder: Path) -> _LocalUpload:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, prefix="upload-")
        return cls(Path(name), os.fdopen(fd, "wb"))

    def write(self, data: bytes) -> None:
        self.sha256.update(data)
        self.file.write(data)

    def finish(self) -> os.stat_result:
        # fsync before the rename: otherwise a crash can leave the new name on an empty file.
        self.file.flush()
        os.fsync(self.file.fileno())
        st = os.fstat(self.file.fileno())
        self.file.close()
        return st

    def discard(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


class LocalObjectStore(ObjectStore):
    """Objects as files under `root`: `data/<key>` holds the bytes, `meta/<key>` a JSON sidecar
    with the SHA-256 and content type, `tmp/` uploads in progress (same file system, so that the
    final os.replace is atomic and a failed upload leaves nothing behind).

    A key and a longer key that extends it as a folder ('a' and 'a/b') cannot both exist here,
    unlike in S3; the second one is refused with Conflict."""

    def __init__(self, root: Path, *, max_threads: int = 16) -> None:
        self.root = root.absolute()
        self._data = self.root / "data"
        self._meta = self.root / "meta"
        self._tmp = self.root / "tmp"
        self._limiter = anyio.CapacityLimiter(max_threads)

    async def _run(self, fn: Callable[[Unpack[Ts]], T], *args: *Ts) -> T:
        return await _in_thread(self._limiter, fn, *args)

    @staticmethod
    def _checked_key(key: str) -> str:
        validate_key(key)
        if any(len(segment.encode()) > 255 for segment in key.split("/")):
            raise BadRequest(
                f"invalid object key {key!r}: a path segment is longer than 255 bytes, the most "
                "a file name can have in the local store",
                extra={"field": "key"},
            )
        return key

    async def put_stream(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        *,
        content_type: str | None = None,
        max_bytes: int | None = None,
    ) -> ObjectInfo:
        key = self._checked_key(key)
        content_type = content_type or DEFAULT_CONTENT_TYPE
        upload = await self._run(_LocalUpload.create, self._tmp)
        try:
            pieces = _pieces(chunks, key=key, limit=max_bytes)
            async with contextlib.aclosing(pieces):
                async for piece in pieces:
                    await self._run(upload.write, piece)
            return await self._run(self._commit, upload, key, content_type)
        except BaseException:
            await self._run(upload.discard)
            raise

    async def put_file(
        self,
        key: str,
        path: Path,
        *,
        content_type: str | None = None,
        sha256: str | None = None,
    ) -> ObjectInfo:
        key = self._checked_key(key)
        return await self._run(self._put_file_sync, key, path,
                               content_type or DEFAULT_CONTENT_TYPE, sha256)

    def _put_file_sync(self, key: str, path: Path, content_type: str,
                       sha256: str | None) -> ObjectInfo:
        self._tmp.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self._tmp, prefix="upload-")
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as out, path.open("rb") as src:
                if sha256 is None:
                    digest = hashlib.sha256()
                    while data := src.read(DEFAULT_CHUNK_SIZE):
                        digest.update(data)
                        out.write(data)
                    sha256 = digest.hexdigest()
                else:
                    shutil.copyfileobj(src, out, 8 << 20)  # copy_file_range where it can
                out.flush()
                os.fsync(out.fileno())
                st = os.fstat(out.fileno())
            return self._commit_file(tmp, st, sha256, key, content_type)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _commit(self, upload: _LocalUpload, key: str, content_type: str) -> ObjectInfo:
        st = upload.finish()
        return self._commit_file(upload.path, st, upload.sha256.hexdigest(), key, content_type)

    def _commit_file(self, path: Path, st: os.stat_result, sha256: str, key: str,
                     content_type: str) -> ObjectInfo:
        # The sidecar names the data file it describes (inode, size, mtime): the two renames
        # below are not one atomic step, and a crash or a concurrent upload of the same key in
        # between must not pair these bytes with another upload's hash.
        meta = {
            "sha256": sha256,
            "content_type": content_type,
            "size": st.st_size,
            "ino": st.st_ino,
            "mtime_ns": st.st_mtime_ns,
        }
        fd, name = tempfile.mkstemp(dir=self._tmp, prefix="meta-")
        meta_tmp = Path(name)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(meta, f)
            self._move_into_place(path, self._data / key, key)
            self._move_into_place(meta_tmp, self._meta / key, key)
        finally:
            meta_tmp.unlink(missing_ok=True)
        return ObjectInfo(key, st.st_size, sha256, content_type)

    @staticmethod
    def _move_into_place(src: Path, dst: Path, key: str) -> None:
        for attempt in range(3):
            try:
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
                return
            except FileNotFoundError:
                # A concurrent delete pruned the empty parent folder between mkdir and replace.
                if attempt == 2:
                    raise
            except (FileExistsError, NotADirectoryError) as exc:
                raise Conflict(
                    f"cannot store object {key!r}: a shorter key on its path is already an "
                    "object, and the local store keeps keys as files and prefixes as folders"
                ) from exc
            except IsADirectoryError as exc:
                raise Conflict(
                    f"cannot store object {key!r}: other objects use it as a prefix "
                    f"('{key}/…'), and the local store keeps prefixes as folders"
                ) from exc

    def _open_range(self, key: str, start: int, end: int | None) -> tuple[BinaryIO, int]:
        try:
            f = (self._data / key).open("rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise NotFound(f"object {key!r} not found", extra={"key": key}) from exc
        try:
            offset, length = _byte_range(key, os.fstat(f.fileno()).st_size, start, end)
            f.seek(offset)
        except BaseException:
            f.close()
            raise
        return f, length

    async def get_stream(
        self,
        key: str,
        *,
        start: int = 0,
        end: int | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> AsyncIterator[bytes]:
        key = self._checked_key(key)
        _check_range(start, end)
        _check_chunk_size(chunk_size)
        # The open file keeps reading the version it opened even if the key is replaced meanwhile.
        f, remaining = await self._run(self._open_range, key, start, end)
        try:
            while remaining > 0:
                data = await self._run(f.read, min(chunk_size, remaining))
                if not data:
                    break
                remaining -= len(data)
                yield data
        finally:
            await self._run(f.close)

    def _stat_sync(self, key: str) -> ObjectInfo:
        try:
            st = (self._data / key).stat()
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise NotFound(f"object {key!r} not found", extra={"key": key}) from exc
        if not stat.S_ISREG(st.st_mode):
            raise NotFound(f"object {key!r} not found", extra={"key": key})
        sha256, content_type = self._read_meta(key, st)
        return ObjectInfo(key, st.st_size, sha256, content_type)

    def _read_meta(self, key: str, st: os.stat_result) -> tuple[str | None, str | None]:
        try:
            meta: object = json.loads((self._meta / key).read_bytes())
        except (OSError, ValueError):
            return None, None
        if not isinstance(meta, dict):
            return None, None
        names_this_file = (meta.get("ino"), meta.get("size"), meta.get("mtime_ns")) == (
            st.st_ino,
            st.st_size,
            st.st_mtime_ns,
        )
        if not names_this_file:
            return None, None
        sha256, content_type = meta.get("sha256"), meta.get("content_type")
        return (
            sha256 if isinstance(sha256, str) else None,
            content_type if isinstance(content_type, str) else None,
        )

    async def stat(self, key: str) -> ObjectInfo:
        return await self._run(self._stat_sync, self._checked_key(key))

    def _delete_sync(self, key: str) -> None:
        for tree in (self._data, self._meta):
            path = tree / key
            with contextlib.suppress(FileNotFoundError, NotADirectoryError, IsADirectoryError):
                path.unlink()
            # Empty folders left behind would block a later object named like the folder.
            folder = path.parent
            while folder != tree:
                try:
                    folder.rmdir()
                except OSError:
                    break
                folder = folder.parent

    async def delete(self, key: str) -> None:
        await self._run(self._delete_sync, self._checked_key(key))

    def _ping_sync(self) -> None:
        try:
            for folder in (self._data, self._meta, self._tmp):
                folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self._tmp, prefix="ping-") as f:
                f.write(b"ok")
        except OSError as exc:
            raise ServiceUnavailable(
                f"local object store at {self.root} is not writable: {exc.strerror or exc}"
            ) from exc

    async def ping(self) -> None:
        await self._run(self._ping_sync)

    async def close(self) -> None:
        return None

    def _scan(self, folder: str) -> builtins.list[tuple[str, bool]]:
        """Entries of one folder as (key, is_folder), in reverse key order for a pop() stack."""
        path = self._data / folder if folder else self._data
        try:
            with os.scandir(path) as it:
                entries = [
                    (e.name, e.is_dir(follow_symlinks=False))
                    for e in it
                    if e.is_dir(follow_symlinks=False) or e.is_file(follow_symlinks=False)
                ]
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:  # no stored key can have such a segment
                return []
            raise
        # Sorting folder 'a' as 'a/' yields objects in the byte order of their full keys, as S3
        # lists them ('a-c' < 'a/b'), while only one folder at a time is held in memory.
        entries.sort(key=lambda e: e[0] + "/" if e[1] else e[0], reverse=True)
        base = f"{folder}/" if folder else ""
        return [(base + name, is_folder) for name, is_folder in entries]

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        prefix = _validate_prefix(prefix)
        stack = await self._run(self._scan, prefix.rpartition("/")[0])
        while stack:
            key, is_folder = stack.pop()
            if is_folder:
                if f"{key}/".startswith(prefix) or prefix.startswith(f"{key}/"):
                    stack.extend(await self._run(self._scan, key))
            elif key.startswith(prefix):
                try:
                    yield await self._run(self._stat_sync, key)
                except NotFound:
                    continue  # deleted since its folder was read
