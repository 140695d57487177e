"""S3ObjectStore: objects in an S3 bucket through the minio client (distributed mode)."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import io
import itertools
import logging
import queue
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Unpack, cast
from urllib.parse import urlsplit

import anyio
import urllib3
from minio import Minio
from minio.commonconfig import REPLACE, CopySource
from minio.datatypes import Object
from minio.error import MinioException, S3Error
from minio.helpers import ObjectWriteResult
from urllib3.exceptions import HTTPError as Urllib3HTTPError

from workbench.errors import (
    BadRequest,
    NotFound,
    ServiceUnavailable,
    UpstreamError,
    WorkbenchError,
)
from workbench.storage import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_CONTENT_TYPE,
    ObjectInfo,
    ObjectStore,
    T,
    Ts,
    _check_chunk_size,
    _check_range,
    _in_thread,
    _pieces,
    _validate_prefix,
    file_sha256,
    validate_key,
)

log = logging.getLogger("workbench.storage")


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

    async def put_file(
        self,
        key: str,
        path: Path,
        *,
        content_type: str | None = None,
        sha256: str | None = None,
    ) -> ObjectInfo:
        key = validate_key(key)
        content_type = content_type or DEFAULT_CONTENT_TYPE
        await self.ensure_bucket()
        if sha256 is None:
            sha256 = await _in_thread(self._calls, file_sha256, path)
        size = await self._call(self._fput, key, path, content_type, sha256, key=key,
                                limiter=self._uploads)
        return ObjectInfo(key, size, sha256, content_type)

    def _fput(self, key: str, path: Path, content_type: str, sha256: str) -> int:
        # The file is complete and re-readable, so parts can go in parallel (the source cannot
        # fail mid-upload the way a stream can), and the hash travels with the upload.
        self._client.fput_object(
            self.bucket, key, str(path), content_type=content_type,
            metadata={_SHA256_HEADER: sha256}, part_size=self._part_size,
            num_parallel_uploads=3)
        return path.stat().st_size

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
