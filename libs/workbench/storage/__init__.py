"""Object storage for every service: one async interface over a local folder (embedded mode) or
an S3 bucket (distributed mode), streaming in bounded chunks, with size limits and SHA-256.

This module is the public interface (ObjectInfo, ObjectStore, key validation, the factory) and
holds what both backends share; the backends live in `local` and `s3`."""

from __future__ import annotations

import asyncio
import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, TypeVarTuple, Unpack

import anyio
import anyio.to_thread

from workbench.errors import BadRequest, NotFound, PayloadTooLarge
from workbench.settings import CoreSettings, ObjectStoreSettings, RunMode

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_CONTENT_TYPE",
    "MAX_CHUNK_SIZE",
    "MAX_KEY_BYTES",
    "LocalObjectStore",
    "ObjectInfo",
    "ObjectStore",
    "S3ObjectStore",
    "file_chunks",
    "file_sha256",
    "object_store_from_settings",
    "validate_key",
]

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


async def file_chunks(path: Path, chunk_size: int = DEFAULT_CHUNK_SIZE) -> AsyncIterator[bytes]:
    """A local file's bytes in chunks, read off the event loop."""
    f = await anyio.open_file(path, "rb")
    try:
        while data := await f.read(chunk_size):
            yield data
    finally:
        await f.aclose()


def file_sha256(path: Path) -> str:
    """SHA-256 of a local file (blocking: call it in a thread)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while data := f.read(DEFAULT_CHUNK_SIZE):
            digest.update(data)
    return digest.hexdigest()


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

    async def put_file(
        self,
        key: str,
        path: Path,
        *,
        content_type: str | None = None,
        sha256: str | None = None,
    ) -> ObjectInfo:
        """Stores the file at `path` under `key` (the file is left in place). `sha256`, when
        the caller already has it, saves a read of the file. Backends override this with their
        fastest whole-file path (a kernel copy, a parallel multipart upload)."""

        return await self.put_stream(key, file_chunks(path), content_type=content_type)

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


# The backends subclass ObjectStore and use the helpers above, so they are imported only once
# those are defined.
from workbench.storage.local import LocalObjectStore  # noqa: E402
from workbench.storage.s3 import S3ObjectStore  # noqa: E402


def object_store_from_settings(core: CoreSettings, s: ObjectStoreSettings) -> ObjectStore:
    """S3 when WB_S3_ENDPOINT is set, else files under WB_DATA_DIR/objects (embedded mode only:
    in distributed mode each container would keep its own objects, so S3 is required)."""
    if s.s3_endpoint:
        return S3ObjectStore(
            s.s3_endpoint,
            s.s3_access_key,
            s.s3_secret_key.get_secret_value(),
            s.s3_bucket,
            s.s3_secure,
            s.s3_region,
        )
    if core.mode is RunMode.DISTRIBUTED:
        raise ValueError(
            "WB_S3_ENDPOINT must be set in distributed mode: the local object folder "
            f"({core.data_dir / 'objects'}) would not be shared between containers, so each "
            "would keep its own objects"
        )
    return LocalObjectStore(core.data_dir / "objects")
