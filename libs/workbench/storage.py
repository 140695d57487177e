"""Object storage for every service: one async interface over a local folder (embedded mode) or
an S3 bucket (distributed mode), streaming in bounded chunks, with size limits and SHA-256."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import hashlib
import io
import itertools
import json
import logging
import os
import queue
import re
import stat
import tempfile
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar, TypeVarTuple, Unpack, cast
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import urllib3
from minio import Minio
from minio.commonconfig import REPLACE, CopySource
from minio.datatypes import Object
from minio.error import MinioException, S3Error
from minio.helpers import ObjectWriteResult
from urllib3.exceptions import HTTPError as Urllib3HTTPError

from workbench.errors import (
    BadRequest,
    Conflict,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    UpstreamError,
    WorkbenchError,
)
from workbench.settings import CoreSettings, ObjectStoreSettings

log = logging.getLogger("workbench.storage")

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

DEFAULT_CONTENT_TYPE = "application/octet-stream"
DEFAULT_CHUNK_SIZE = 1 << 20
MAX_CHUNK_SIZE = 16 << 20
MAX_KEY_BYTES = 1024
# Source chunks are re-cut to about this size before a thread hop: an HTTP body arrives in pieces
# of a few KiB, and one hop per piece would cost more than the I/O it does.
_PIECE_SIZE = 1 << 20
_FORBIDDEN_KEY_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    sha256: str | None
    content_type: str | None


def validate_key(key: str) -> str:
    """Returns `key` if it is a valid object key, else raises BadRequest saying what is wrong.

    Keys are '/'-separated paths of at most 1024 UTF-8 bytes with no leading '/', no empty, '.' or
    '..' segments, no backslashes and no control characters, so that they map onto a file tree
    as safely as onto S3."""
    problem = _key_problem(key, allow_prefix=False)
    if problem:
        raise BadRequest(f"invalid object key {key!r}: {problem}", extra={"field": "key"})
    return key


def _validate_prefix(prefix: str) -> str:
    problem = _key_problem(prefix, allow_prefix=True)
    if problem:
        raise BadRequest(
            f"invalid object key prefix {prefix!r}: {problem}", extra={"field": "prefix"}
        )
    return prefix


def _key_problem(key: str, *, allow_prefix: bool) -> str | None:
    if not key:
        return None if allow_prefix else "it is empty"
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        return "it is not valid Unicode text"
    if size > MAX_KEY_BYTES:
        return f"it is {size} bytes long, the most is {MAX_KEY_BYTES} (UTF-8)"
    if key.startswith("/"):
        return "it starts with '/'; keys are relative, like 'datasets/42/train.parquet'"
    if _FORBIDDEN_KEY_CHARS.search(key):
        return "it contains a backslash or a control character"
    # A prefix ends in a partial segment ('datasets/4' matches 'datasets/42/…'), so only the
    # segments before its last '/' must be whole, valid ones.
    segments = key.split("/")[:-1] if allow_prefix else key.split("/")
    if any(s in ("", ".", "..") for s in segments):
        return "it has an empty, '.' or '..' path segment"
    return None


def _check_range(start: int, end: int | None) -> None:
    if start < 0 or (end is not None and end < start):
        raise BadRequest(
            f"invalid byte range {start}-{'' if end is None else end}: the start must be 0 or more "
            "and the end (inclusive) no less than the start",
            code="range_not_satisfiable",
        )


def _check_chunk_size(chunk_size: int) -> None:
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be between 1 and {MAX_CHUNK_SIZE}, got {chunk_size}")


def _too_large(key: str, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"object {key!r} is larger than the limit of {limit} bytes; nothing was stored",
        extra={"max_bytes": limit},
    )


async def _pieces(
    chunks: AsyncIterable[bytes], *, key: str, limit: int | None
) -> AsyncGenerator[bytes, None]:
    """The source re-cut into pieces of about _PIECE_SIZE; raises PayloadTooLarge as soon as the
    total passes `limit`, before the offending bytes are written anywhere."""
    total = 0
    pending = bytearray()
    async for chunk in chunks:
        total += len(chunk)
        if limit is not None and total > limit:
            raise _too_large(key, limit)
        if not pending and len(chunk) >= _PIECE_SIZE:
            yield bytes(chunk)
            continue
        pending += chunk
        if len(pending) >= _PIECE_SIZE:
            yield bytes(pending)
            pending.clear()
    if pending:
        yield bytes(pending)


async def _in_thread(
    limiter: anyio.CapacityLimiter, fn: Callable[[Unpack[Ts]], T], *args: *Ts
) -> T:
    """Runs blocking `fn` in a worker thread, at most `limiter.total` at a time per store."""
    task = asyncio.ensure_future(anyio.to_thread.run_sync(fn, *args, limiter=limiter))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        # A thread cannot be interrupted. Let it finish before the caller's cleanup runs, which
        # closes or deletes the very file the thread may still be writing.
        await asyncio.wait({task})
        raise


def _byte_range(key: str, size: int, start: int, end: int | None) -> tuple[int, int]:
    """(offset, length) of the bytes start..end (inclusive, end clipped to the object) as HTTP
    ranges have them; the default 0..None is the whole object, even an empty one."""
    _check_range(start, end)
    if start == 0 and end is None:
        return 0, size
    if start >= size:
        raise BadRequest(
            f"byte range starting at {start} is not satisfiable: object {key!r} has {size} bytes",
            code="range_not_satisfiable",
            extra={"size": size},
        )
    last = size - 1 if end is None else min(end, size - 1)
    return start, last - start + 1


class ObjectStore(ABC):
    """Where services keep files: dataset uploads, documents, model artifacts, exports.

    Reads and writes stream; no method holds a whole object in memory. Errors are the library's
    typed errors: NotFound for a missing key, BadRequest for a bad key or range, PayloadTooLarge
    past max_bytes, ServiceUnavailable/UpstreamError when the backend fails."""

    @abstractmethod
    async def put_stream(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        *,
        content_type: str | None = None,
        max_bytes: int | None = None,
    ) -> ObjectInfo:
        """Stores the bytes of `chunks` under `key`, replacing any object there, and returns its
        size and SHA-256. If the source raises, the upload is cancelled or it passes max_bytes,
        nothing is stored and the previous object (if any) is left as it was."""

    async def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> ObjectInfo:
        async def one_chunk() -> AsyncIterator[bytes]:
            yield data

        return await self.put_stream(key, one_chunk(), content_type=content_type)

    @abstractmethod
    def get_stream(
        self,
        key: str,
        *,
        start: int = 0,
        end: int | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> AsyncIterator[bytes]:
        """The bytes start..end (end inclusive, like HTTP ranges; None for the rest) in chunks of
        at most chunk_size. NotFound and range errors are raised on the first iteration, so call
        stat() first when response headers depend on them."""

    @abstractmethod
    async def stat(self, key: str) -> ObjectInfo:
        """Size, SHA-256 and content type of `key`; NotFound if there is no such object."""

    async def exists(self, key: str) -> bool:
        try:
            await self.stat(key)
        except NotFound:
            return False
        return True

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Removes `key`; deleting a missing key is not an error."""

    @abstractmethod
    async def ping(self) -> None:
        """Readiness check: returns when the store can be written to, raises ServiceUnavailable
        (or another WorkbenchError) saying why not."""

    @abstractmethod
    async def close(self) -> None:
        """Releases connections and pools; the store is not used afterwards."""

    @abstractmethod
    def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        """Objects whose key starts with `prefix` (a plain string prefix, as in S3), in key order
        (SeaweedFS differs: it lists folder by folder, 'a/x' before 'a-c'). sha256 and
        content_type may be None where the backend cannot list them cheaply; stat() has them."""


# --------------------------------------------------------------------------- local folder


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

    def _commit(self, upload: _LocalUpload, key: str, content_type: str) -> ObjectInfo:
        st = upload.finish()
        sha256 = upload.sha256.hexdigest()
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
            self._move_into_place(upload.path, self._data / key, key)
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


# --------------------------------------------------------------------------- S3


class _ReaderGone(Exception):
    """The uploading thread stopped reading (it failed); awaiting its task says why."""


class _UploadAborted(Exception):
    """Raised inside minio's put_object to make it abort the multipart upload."""


_Item = bytes | BaseException | None


class _ChunkPipe:
    """Hands chunks from the event loop to the thread running minio's put_object, which reads it
    like a file. At most `depth` chunks wait in between, so a slow upload slows the sender down
    instead of buffering the object. The reader hashes what it hands out."""

    def __init__(self, loop: asyncio.AbstractEventLoop, depth: int) -> None:
        self._loop = loop
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._space = asyncio.Semaphore(depth)
        self._reader_gone = False
        self._pending = b""
        self._offset = 0
        self._eof = False
        self.sha256 = hashlib.sha256()
        self.size = 0

    # event loop side
    async def send(self, chunk: bytes) -> None:
        await self._space.acquire()
        if self._reader_gone:
            raise _ReaderGone
        self._queue.put(chunk)

    def finish(self) -> None:
        self._queue.put(None)

    def abort(self, exc: BaseException) -> None:
        self._queue.put(exc)

    def _mark_reader_gone(self) -> None:
        self._reader_gone = True
        self._space.release()  # wakes a sender waiting for space, which then sees the flag

    # thread side
    def _notify(self, callback: Callable[[], None]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(callback)

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes of one chunk; blocks only while none is there, b"" at the end.
        Handing chunks over one at a time lets each go as soon as minio has added it to a part."""
        if self._offset == len(self._pending):
            if self._eof:
                return b""
            item = self._queue.get()
            if item is None:
                self._eof = True
                return b""
            if isinstance(item, BaseException):
                self._eof = True
                raise _UploadAborted from item
            self._notify(self._space.release)
            self._pending, self._offset = item, 0
        left = len(self._pending) - self._offset
        take = left if size < 0 else min(size, left)
        if take == len(self._pending):
            data = self._pending  # the whole chunk: no copy
        else:
            data = self._pending[self._offset : self._offset + take]
        self._offset += take
        self.sha256.update(data)
        self.size += len(data)
        return data

    def reader_stopped(self) -> None:
        self._notify(self._mark_reader_gone)


def _read_body(response: urllib3.BaseHTTPResponse, size: int) -> bytes:
    # Stored bytes are returned as stored: no transparent gunzip of a Content-Encoding.
    return response.read(size, decode_content=False)


def _release(response: urllib3.BaseHTTPResponse) -> None:
    response.close()
    response.release_conn()


def _take(objects: Iterator[Object], n: int) -> builtins.list[Object]:
    return builtins.list(itertools.islice(objects, n))


def _split_endpoint(endpoint: str, secure: bool) -> tuple[str, bool]:
    """minio wants 'host:port'; settings may also hold a URL, whose scheme then decides TLS."""
    if "://" not in endpoint:
        return endpoint.rstrip("/"), secure
    url = urlsplit(endpoint)
    if url.scheme not in ("http", "https") or not url.netloc or url.path not in ("", "/"):
        raise ValueError(
            f"S3 endpoint {endpoint!r} must be 'host:port' or 'http(s)://host:port' without a path"
        )
    return url.netloc, url.scheme == "https"


_SHA256_HEADER = "x-amz-meta-sha256"
_MAX_PARTS = 10_000  # S3's limit on parts in one multipart upload
_LIST_PAGE = 1000


class S3ObjectStore(ObjectStore):
    """Objects in one S3 bucket (MinIO, SeaweedFS, Ceph, AWS) through the minio client, whose
    blocking calls run in this store's own bounded thread pools.

    The SHA-256 lives in the object's own metadata (x-amz-meta-sha256), so stat() is one HEAD and
    there is no second object to keep in step. An object of up to part_size is buffered and sent
    in one PUT with the hash attached. A larger one streams as a multipart upload, hashed on the
    way; as the hash is known only at the end, it is then attached with a server-side copy of the
    object onto itself (metadata only on MinIO and SeaweedFS). That copy is conditional on the
    ETag of this upload, so a concurrent overwrite never gets our hash; until it is done, stat()
    shows sha256=None. Listings give key and size only (S3 lists no user metadata).

    Incomplete multipart uploads are aborted when the source fails; give the bucket an
    AbortIncompleteMultipartUpload lifecycle rule for those a crash leaves behind."""

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        secure: bool = False,
        region: str = "us-east-1",
        *,
        part_size: int = 10 << 20,
        max_threads: int = 32,
        max_uploads: int = 16,
        timeout_s: float = 60.0,
    ) -> None:
        if not 5 << 20 <= part_size <= 5 << 30:
            raise ValueError("part_size must be between 5 MiB and 5 GiB (S3 multipart limits)")
        if bool(access_key) != bool(secret_key):
            raise ValueError("S3 access key and secret key go together: set both or neither")
        host, secure = _split_endpoint(endpoint, secure)
        self.endpoint = host
        self.bucket = bucket
        self._part_size = part_size
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=min(timeout_s, 10.0), read=timeout_s),
            maxsize=max_threads + max_uploads,  # one connection per worker thread, no more
            # raise_on_status=False: after the retries, minio reads S3's own error message.
            retries=urllib3.Retry(
                total=3,
                backoff_factor=0.2,
                status_forcelist=(500, 502, 503, 504),
                raise_on_status=False,
            ),
        )
        self._client = Minio(
            host,
            access_key=access_key or None,
            secret_key=secret_key or None,
            secure=secure,
            region=region or None,
            http_client=self._http,
        )
        self._calls = anyio.CapacityLimiter(max_threads)
        # A multipart upload holds its thread for as long as the client sends; a separate bound
        # keeps many slow uploads from starving stat/get/delete.
        self._uploads = anyio.CapacityLimiter(max_uploads)
        self._bucket_ready = False
        self._bucket_lock = asyncio.Lock()

    async def _call(
        self,
        fn: Callable[[Unpack[Ts]], T],
        *args: *Ts,
        key: str | None = None,
        limiter: anyio.CapacityLimiter | None = None,
    ) -> T:
        try:
            return await _in_thread(limiter or self._calls, fn, *args)
        except (MinioException, Urllib3HTTPError, OSError) as exc:
            raise self._translate(exc, key) from exc

    def _translate(self, exc: Exception, key: str | None) -> WorkbenchError:
        where = f"object {key!r}" if key is not None else f"bucket {self.bucket!r}"
        if isinstance(exc, S3Error):
            if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound") and key is not None:
                return NotFound(f"object {key!r} not found", extra={"key": key})
            if exc.code == "NoSuchBucket":
                self._bucket_ready = False  # deleted behind our back: recreate on next use
                return ServiceUnavailable(
                    f"bucket {self.bucket!r} does not exist on {self.endpoint}; it is created "
                    "again on next use"
                )
            if exc.code == "InvalidRange":
                return BadRequest(
                    f"byte range is not satisfiable for {where}", code="range_not_satisfiable"
                )
            if exc.code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return ServiceUnavailable(
                    f"object store at {self.endpoint} refused access to {where} ({exc.code}); "
                    "check WB_S3_ACCESS_KEY, WB_S3_SECRET_KEY and the bucket policy"
                )
            return UpstreamError(f"object store error on {where}: {exc.code}: {exc.message}")
        if isinstance(exc, MinioException):
            return UpstreamError(f"object store at {self.endpoint} failed on {where}: {exc}")
        return ServiceUnavailable(f"object store at {self.endpoint} is unreachable: {exc}")

    def _ensure_bucket_sync(self) -> None:
        if self._client.bucket_exists(self.bucket):
            return
        try:
            self._client.make_bucket(self.bucket)
        except S3Error as exc:
            if exc.code != "BucketAlreadyOwnedByYou":  # another process created it just now
                raise

    async def ensure_bucket(self) -> None:
        """Creates the bucket if it is missing; checked once, then remembered."""
        if self._bucket_ready:
            return
        async with self._bucket_lock:
            if not self._bucket_ready:
                await self._call(self._ensure_bucket_sync)
                self._bucket_ready = True

    async def ping(self) -> None:
        await self._call(self._ensure_bucket_sync)
        self._bucket_ready = True

    async def put_stream(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        *,
        content_type: str | None = None,
        max_bytes: int | None = None,
    ) -> ObjectInfo:
        key = validate_key(key)
        content_type = content_type or DEFAULT_CONTENT_TYPE
        # Past 10,000 parts S3 refuses the upload; say so up front instead of at part 10,001.
        limit = _MAX_PARTS * self._part_size
        limit = limit if max_bytes is None else min(max_bytes, limit)
        await self.ensure_bucket()
        # Up to part_size is held back: if the source ends within it, one PUT carries the bytes
        # and their hash together and no copy is needed afterwards.
        head: builtins.list[bytes] = []
        head_size = 0
        pipe: _ChunkPipe | None = None
        upload: asyncio.Future[ObjectWriteResult] | None = None
        try:
            pieces = _pieces(chunks, key=key, limit=limit)
            async with contextlib.aclosing(pieces):
                async for piece in pieces:
                    if pipe is None:
                        head.append(piece)
                        head_size += len(piece)
                        if head_size <= self._part_size:
                            continue
                        pipe = _ChunkPipe(asyncio.get_running_loop(), depth=4)
                        upload = asyncio.ensure_future(
                            self._call(
                                self._upload_multipart,
                                key,
                                pipe,
                                content_type,
                                key=key,
                                limiter=self._uploads,
                            )
                        )
                        outgoing, head = head[::-1], []
                    else:
                        outgoing = [piece]
                    try:
                        while outgoing:  # popped, so a piece is freed once the thread has read it
                            await pipe.send(outgoing.pop())
                    except _ReaderGone:
                        break  # the upload failed; awaiting it below raises why
            if pipe is None or upload is None:
                return await self._put_whole(key, b"".join(head), content_type)
            pipe.finish()
            result = await upload
        except BaseException as exc:
            if pipe is not None and upload is not None:
                pipe.abort(exc)
                await asyncio.wait({upload})  # minio aborts the multipart upload on its way out
                if not upload.cancelled():
                    upload.exception()  # retrieved: the original error is what is raised
            raise
        sha256 = pipe.sha256.hexdigest()
        try:
            await self._call(self._attach_sha256, key, result.etag, sha256, content_type, key=key)
        except WorkbenchError as exc:
            # The bytes are stored and the caller gets the hash; only stat() will lack it.
            log.warning("could not attach sha256 to object %r: %s", key, exc.detail)
        return ObjectInfo(key, pipe.size, sha256, content_type)

    async def _put_whole(self, key: str, data: bytes, content_type: str) -> ObjectInfo:
        sha256 = await _in_thread(self._calls, lambda: hashlib.sha256(data).hexdigest())
        await self._call(self._put_object, key, data, content_type, sha256, key=key)
        return ObjectInfo(key, len(data), sha256, content_type)

    def _put_object(self, key: str, data: bytes, content_type: str, sha256: str) -> None:
        self._client.put_object(
            self.bucket,
            key,
            io.BytesIO(data),
            len(data),
            content_type=content_type,
            metadata={_SHA256_HEADER: sha256},
            part_size=self._part_size,
        )

    def _upload_multipart(self, key: str, pipe: _ChunkPipe, content_type: str) -> ObjectWriteResult:
        try:
            # One part in flight: minio's parallel part pool leaks its threads when the source
            # fails mid-upload, and an abort racing parts still in flight can leave parts behind.
            return self._client.put_object(
                self.bucket,
                key,
                cast(BinaryIO, pipe),
                length=-1,
                content_type=content_type,
                part_size=self._part_size,
                num_parallel_uploads=1,
            )
        finally:
            pipe.reader_stopped()

    def _attach_sha256(self, key: str, etag: str | None, sha256: str, content_type: str) -> None:
        source = CopySource(self.bucket, key, match_etag=etag or None)
        metadata: dict[str, str | builtins.list[str] | tuple[str]] = {
            "Content-Type": content_type,
            _SHA256_HEADER: sha256,
        }
        try:
            self._client.copy_object(
                self.bucket, key, source, metadata=metadata, metadata_directive=REPLACE
            )
        except S3Error as exc:
            if exc.code in ("PreconditionFailed", "NoSuchKey"):
                return  # replaced or deleted since our upload: that newer state wins
            raise

    async def get_stream(
        self,
        key: str,
        *,
        start: int = 0,
        end: int | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> AsyncIterator[bytes]:
        key = validate_key(key)
        _check_range(start, end)
        _check_chunk_size(chunk_size)
        await self.ensure_bucket()
        # minio: length 0 means "to the end", and offset 0 with length 0 sends no Range header,
        # so the default reads an empty object too.
        length = 0 if end is None else end - start + 1
        response = await self._call(
            self._client.get_object, self.bucket, key, start, length, key=key
        )
        try:
            while data := await self._call(_read_body, response, chunk_size, key=key):
                yield data
        finally:
            await _in_thread(self._calls, _release, response)

    def _stat_sync(self, key: str) -> ObjectInfo:
        obj = self._client.stat_object(self.bucket, key)
        sha256 = None
        for name, value in (obj.metadata or {}).items():
            if name.lower() == _SHA256_HEADER:
                sha256 = value if isinstance(value, str) else None
        return ObjectInfo(key, obj.size or 0, sha256, obj.content_type)

    async def stat(self, key: str) -> ObjectInfo:
        key = validate_key(key)
        await self.ensure_bucket()
        return await self._call(self._stat_sync, key, key=key)

    async def delete(self, key: str) -> None:
        key = validate_key(key)
        await self.ensure_bucket()
        await self._call(self._client.remove_object, self.bucket, key, key=key)

    async def close(self) -> None:
        self._http.clear()

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        prefix = _validate_prefix(prefix)
        await self.ensure_bucket()
        # A lazy generator of paginated requests; pulled one page per thread hop.
        objects = iter(
            self._client.list_objects(self.bucket, prefix=prefix or None, recursive=True)
        )
        while True:
            page = await self._call(_take, objects, _LIST_PAGE)
            for obj in page:
                if obj.object_name is not None:
                    yield ObjectInfo(obj.object_name, obj.size or 0, None, None)
            if len(page) < _LIST_PAGE:
                return


def object_store_from_settings(core: CoreSettings, s: ObjectStoreSettings) -> ObjectStore:
    """S3 when WB_S3_ENDPOINT is set, else files under WB_DATA_DIR/objects."""
    if s.s3_endpoint:
        return S3ObjectStore(
            s.s3_endpoint,
            s.s3_access_key,
            s.s3_secret_key.get_secret_value(),
            s.s3_bucket,
            s.s3_secure,
            s.s3_region,
        )
    return LocalObjectStore(core.data_dir / "objects")
