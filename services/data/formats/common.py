"""Shared ground of the dataset formats: the format names, the tuning constants, the error type
and the result types."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

FORMATS = ("csv", "tsv", "jsonl", "json", "parquet", "txt", "zip")
CONTENT_TYPES: dict[str, str] = {
    "csv": "text/csv",
    "tsv": "text/tab-separated-values",
    "jsonl": "application/x-ndjson",
    "json": "application/json",
    "parquet": "application/vnd.apache.parquet",
    "txt": "text/plain",
    "zip": "application/zip",
}
_NAMES = {"csv": "CSV", "tsv": "TSV", "jsonl": "JSON Lines", "json": "JSON", "parquet": "Parquet",
          "txt": "plain text", "zip": "a zip archive"}
_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
               ".json": "json", ".parquet": "parquet", ".pq": "parquet", ".txt": "txt",
               ".text": "txt", ".zip": "zip"}
_TEXT_FORMATS = frozenset({"csv", "tsv", "jsonl", "json", "txt"})
_BINARY_MAGIC = {
    b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image",
    b"%PDF": "a PDF document", b"\x1f\x8b": "a gzip archive", b"BZh": "a bzip2 archive",
    b"\xfd7zXZ": "an xz archive", b"7z\xbc\xaf": "a 7z archive", b"Rar!": "a RAR archive",
    b"\xd0\xcf\x11\xe0": "a legacy Office document", b"ARROW1": "an Arrow IPC file",
    b"ORC": "an ORC file", b"Obj\x01": "an Avro file", b"\x7fELF": "an executable",
    b"MZ": "an executable"}
_CONTROL_BYTES = bytes(b for b in range(32) if b not in b"\t\n\r\f\v\x1b") + b"\x7f"
_WHITESPACE = b" \t\r\n\f\v"
_SAMPLE = 64 << 10  # bytes sniffed by detect_format
_CHUNK = 1 << 20  # read size for the UTF-8 pass and zip extraction
# pyarrow's streaming readers hold some 35 blocks (read-ahead, parsed, converted): small blocks
# keep them near 20 MB. A row longer than a block makes us retry with bigger blocks.
_BLOCK = 512 << 10
_MAX_BLOCK = 8 << 20
_MAX_LINE = 64 << 20  # the longest txt line
_ROWS = 10_000  # rows per batch where we choose
_DISTINCT_CAP = 10_000
_RATIO_FLOOR = 1 << 20  # zip members smaller than this cannot be bombs, whatever their ratio
_ARROW_ERRORS = (pa.ArrowException, OverflowError, TypeError, ValueError)


class FormatError(Exception):
    """A file that is not valid as its format. `message` says what and where, for a user.
    `location` keys: line, row (CSV counts its header as row 1), byte (0-based), column, member,
    row_group. `code`: invalid_file, empty_file, unsafe_archive, format_mismatch, too_large,
    unsupported_type, unsupported_format, unsupported_operation."""

    def __init__(self, message: str, *, location: dict[str, Any] | None = None,
                 code: str = "invalid_file") -> None:
        super().__init__(message)
        self.message = message
        self.location: dict[str, Any] = dict(location or {})
        self.code = code


@dataclass
class ZipLimits:
    max_members: int = 1000
    max_total_uncompressed: int = 4 << 30
    max_ratio: float = 200.0  # uncompressed/compressed per member (zip bomb)


@dataclass
class Analysis:
    format: str
    content_type: str
    schema: list[dict[str, Any]]
    row_count: int
    stats: dict[str, dict[str, Any]]
    preview: list[dict[str, Any]]
    members: list[dict[str, Any]] | None = None


def _require_format(fmt: str | None) -> None:
    if fmt not in FORMATS:
        raise FormatError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}",
                          code="unsupported_format")
