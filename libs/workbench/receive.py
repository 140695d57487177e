"""Receiving a file body (dataset uploads, knowledge-base documents) into a local temporary file
without holding it in memory: a raw body or a streamed multipart/form-data part, hashed (SHA-256)
and size-limited on the way."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import anyio.to_thread
from python_multipart.multipart import MultipartParser, parse_options_header

from workbench.errors import BadRequest, PayloadTooLarge

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

# Body pieces are gathered to about this size before a thread hop writes them.
_PIECE = 1 << 20
# Form fields beside the file (note, format, …) are small.
_MAX_FIELD_BYTES = 64 << 10


@dataclass
class Received:
    path: Path
    size: int
    sha256: str
    filename: str | None = None
    fields: dict[str, str] = field(default_factory=dict)


class _Sink:
    """The temp file being written, hashed as it grows; writes happen in a worker thread."""

    def __init__(self, path: Path, limit: int, too_large: str) -> None:
        self.path = path
        self.limit = limit
        self.too_large = too_large
        self.size = 0
        self.digest = hashlib.sha256()
        self.file: BinaryIO = path.open("wb")
        self.pending: list[bytes] = []
        self.pending_size = 0

    def _write(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self.digest.update(piece)
            self.file.write(piece)

    async def add(self, data: bytes) -> None:
        if not data:
            return
        self.size += len(data)
        if self.size > self.limit:
            raise PayloadTooLarge(self.too_large, extra={"limit": self.limit})
        self.pending.append(data)
        self.pending_size += len(data)
        if self.pending_size >= _PIECE:
            await self.flush()

    async def flush(self) -> None:
        if self.pending:
            pieces, self.pending, self.pending_size = self.pending, [], 0
            await anyio.to_thread.run_sync(self._write, pieces)

    async def close(self) -> str:
        await self.flush()
        await anyio.to_thread.run_sync(self.file.close)
        return self.digest.hexdigest()

    def discard(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


def temp_path(folder: Path, prefix: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{prefix}-{os.urandom(8).hex()}"


async def receive_raw(body: AsyncIterator[bytes], folder: Path, *, limit: int,
                      too_large: str) -> Received:
    """The whole body is the file."""
    sink = _Sink(temp_path(folder, "raw"), limit, too_large)
    try:
        async for chunk in body:
            await sink.add(chunk)
        sha = await sink.close()
    except BaseException:
        sink.discard()
        raise
    return Received(sink.path, sink.size, sha)


async def receive_multipart(body: AsyncIterator[bytes], content_type: str, folder: Path, *,
                            limit: int, too_large: str, file_field: str = "file") -> Received:
    """A multipart/form-data body with one file part named `file_field` (streamed to disk)
    and small text fields beside it."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest("multipart body without a boundary in its Content-Type",
                         code="invalid_multipart")
    sink = _Sink(temp_path(folder, "form"), limit, too_large)
    state = _FormState(file_field)
    parser = MultipartParser(boundary, state.callbacks())
    try:
        async for chunk in body:
            try:
                parser.write(chunk)
            except Exception as exc:
                raise BadRequest(f"the multipart body is malformed: {exc}",
                                 code="invalid_multipart") from exc
            state.check()
            for piece in state.take_file_data():
                await sink.add(piece)
        parser.finalize()
        if not state.ended:
            raise BadRequest("the multipart body ended before its closing boundary (was the "
                             "upload cut short?)", code="invalid_multipart")
        if state.file_seen is False:
            raise BadRequest(f"the form has no file part named {file_field!r}",
                             code="missing_file", extra={"field": file_field})
        sha = await sink.close()
    except BaseException:
        sink.discard()
        raise
    return Received(sink.path, sink.size, sha, filename=state.filename, fields=state.fields)


class _FormState:
    """Collects what python-multipart's callbacks report for the part being read."""

    def __init__(self, file_field: str) -> None:
        self.file_field = file_field
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.file_seen = False
        self.ended = False
        self.error: str | None = None
        self._headers: dict[bytes, bytes] = {}
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._name: str | None = None
        self._is_file = False
        self._value = bytearray()
        self._file_data: list[bytes] = []

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._header_field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._headers, self._name, self._is_file = {}, None, False
        self._value = bytearray()

    def _header_end(self) -> None:
        self._headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field, self._header_value = bytearray(), bytearray()

    def _headers_finished(self) -> None:
        disposition, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        if disposition != b"form-data" or b"name" not in params:
            self.error = "a form part has no Content-Disposition: form-data; name=…"
            return
        self._name = params[b"name"].decode("utf-8", "replace")
        if self._name == self.file_field:
            if self.file_seen:
                self.error = f"the form has more than one {self.file_field!r} part"
                return
            self._is_file = True
            self.file_seen = True
            raw = params.get(b"filename")
            self.filename = raw.decode("utf-8", "replace") if raw else None

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            self._file_data.append(bytes(data[start:end]))
        elif self._name is not None:
            self._value.extend(data[start:end])
            if len(self._value) > _MAX_FIELD_BYTES:
                self.error = f"form field {self._name!r} is longer than {_MAX_FIELD_BYTES} bytes"

    def _part_end(self) -> None:
        if self._name is not None and not self._is_file:
            try:
                self.fields[self._name] = self._value.decode("utf-8")
            except UnicodeDecodeError:
                self.error = f"form field {self._name!r} is not UTF-8 text"
        self._is_file = False

    def _end(self) -> None:
        self.ended = True

    def check(self) -> None:
        if self.error:
            raise BadRequest(self.error, code="invalid_multipart")

    def take_file_data(self) -> list[bytes]:
        data, self._file_data = self._file_data, []
        return data
