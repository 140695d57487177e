"""Dataset file formats: detect a file's format from its content, validate and analyze it, stream
its rows and write transformed copies, all in bounded memory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from services.data.formats.archive import _analyze_zip
from services.data.formats.common import (
    _TEXT_FORMATS,
    CONTENT_TYPES,
    FORMATS,
    Analysis,
    FormatError,
    ZipLimits,
    _require_format,
)
from services.data.formats.detection import _first_text, detect_format
from services.data.formats.reading import _check_utf8, _open, _Plan, _Retry
from services.data.formats.summary import _read
from services.data.formats.writing import BatchWriter

__all__ = [
    "CONTENT_TYPES",
    "FORMATS",
    "Analysis",
    "BatchWriter",
    "FormatError",
    "ZipLimits",
    "analyze",
    "detect_format",
    "iter_batches",
]


def analyze(path: Path, fmt: str, *, preview_rows: int = 20, zip_limits: ZipLimits | None = None,
            max_json_bytes: int = 256 << 20) -> Analysis:
    """Validate the whole file as `fmt` and analyze it; FormatError says what broke and where."""
    _require_format(fmt)
    path = Path(path)
    if fmt == "zip":
        return _analyze_zip(path, preview_rows, zip_limits or ZipLimits(), max_json_bytes,
                            analyze)
    if fmt == "json" and path.stat().st_size > max_json_bytes:
        raise FormatError(f"JSON files over {max_json_bytes >> 20} MB are not supported; use JSON "
                          "Lines", code="too_large")
    if path.stat().st_size == 0 or (fmt in _TEXT_FORMATS and not _first_text(path)[1]):
        raise FormatError("the file is empty", code="empty_file")
    if fmt in _TEXT_FORMATS:
        _check_utf8(path)  # first: readers then never meet bad bytes, and the error has a place
    summary = _read(path, fmt, max_json_bytes, preview_rows)[1]
    assert summary is not None
    return summary.analysis(fmt)


def iter_batches(path: Path, fmt: str, *, batch_rows: int = 10_000,
                 max_json_bytes: int = 256 << 20) -> Iterator[pa.RecordBatch]:
    """Rows of a valid file as record batches of at most `batch_rows` rows, streaming. CSV, TSV and
    JSON Lines are read through once first, so that a column whose type changes late in the file
    has its final type from the first batch on."""
    _require_format(fmt)
    if fmt == "zip":
        raise FormatError("a zip archive has no rows of its own; read its members",
                          code="unsupported_operation")
    path = Path(path)
    plan = _read(path, fmt, max_json_bytes, None)[0] if fmt in ("csv", "tsv", "jsonl") else _Plan()
    try:
        for batch in _open(path, fmt, plan, batch_rows, max_json_bytes)[1]:
            for start in range(0, batch.num_rows, batch_rows):
                yield batch.slice(start, batch_rows)
    except _Retry:  # only if the file changed since the first pass
        raise FormatError("the file changed while it was read") from None
