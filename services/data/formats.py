"""Dataset file formats: detect a file's format from its content, validate and analyze it, stream
its rows and write transformed copies, all in bounded memory."""

from __future__ import annotations

import base64
import codecs
import csv
import datetime as dt
import math
import re
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, NoReturn

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

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


# --- detection -------------------------------------------------------------------------------


def _require_format(fmt: str | None) -> None:
    if fmt not in FORMATS:
        raise FormatError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}",
                          code="unsupported_format")


def _first_text(path: Path) -> tuple[bytes, bytes]:
    """(the file's first bytes, the text from its first non-whitespace byte after any BOM)."""
    with path.open("rb") as f:
        head = f.read(_SAMPLE)
        text = head.removeprefix(codecs.BOM_UTF8).lstrip(_WHITESPACE)
        while not text and (chunk := f.read(_CHUNK)):  # a file that starts with much whitespace
            text = chunk.lstrip(_WHITESPACE)[:_SAMPLE]
    return head, text


def _sniff(path: Path, ext_fmt: str | None) -> tuple[str, frozenset[str]]:
    """(best guess, formats the content is consistent with)."""
    head, text = _first_text(path)
    if head.startswith(b"PAR1"):
        return "parquet", frozenset({"parquet"})
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        if b"[Content_Types].xml" in head[30:80] or b"mimetypeapplication" in head[30:80]:
            raise FormatError("unsupported file type: an office document; export it as CSV",
                              code="unsupported_type")
        return "zip", frozenset({"zip"})
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise FormatError("unsupported file type: UTF-16 text; save the file as UTF-8",
                          code="unsupported_type")
    controls = len(head) - len(head.translate(None, _CONTROL_BYTES))
    binary = b"\x00" in head or controls > len(head) // 10
    for magic, what in _BINARY_MAGIC.items():
        # A magic of printable characters could start a text file ("MZ,..." in a header).
        if head.startswith(magic) and (binary or not 0x20 <= magic[0] < 0x7F):
            raise FormatError(f"unsupported file type: {what}", code="unsupported_type")
    if binary:
        raise FormatError("unsupported file type: binary data that is none of "
                          f"{', '.join(FORMATS)}", code="unsupported_type")
    if not text:
        raise FormatError("the file is empty", code="empty_file")
    first_line, _, rest = text.partition(b"\n")
    if text.startswith(b"["):
        return "json", frozenset({"json", "txt"})
    if text.startswith(b"{"):
        try:
            is_object = isinstance(orjson.loads(first_line), dict)
        except orjson.JSONDecodeError:
            # A first line longer than the sample cannot be judged; otherwise an object that
            # spans lines is a pretty-printed JSON document.
            is_object = not rest and len(head) == _SAMPLE
        if not is_object:
            return "json", frozenset({"json", "jsonl", "txt"})
        many = rest.lstrip(_WHITESPACE).startswith(b"{")
        return "jsonl", frozenset({"jsonl", "txt"} if many else {"jsonl", "json", "txt"})
    tabs, commas = first_line.count(b"\t"), first_line.count(b",")
    guess = "tsv" if tabs > commas else "csv" if commas else "txt"
    # The header's delimiters decide when only one kind occurs; otherwise the extension does.
    if ext_fmt == "txt" or (ext_fmt in ("csv", "tsv") and (tabs > 0) == (commas > 0)):
        guess = ext_fmt
    return guess, frozenset({"csv", "tsv", "txt"})


def detect_format(path: Path, filename: str | None, declared: str | None = None) -> str:
    """The file's format from its content: `declared` wins when the content is consistent with
    it, then the filename's extension does. FormatError codes: empty_file, format_mismatch,
    unsupported_type (other binary content), unsupported_format (an unknown `declared`)."""
    if declared is not None:
        _require_format(declared)
    ext_fmt = _EXTENSIONS.get(Path(filename).suffix.lower()) if filename else None
    guess, consistent = _sniff(Path(path), ext_fmt)
    if declared is not None:
        if declared in consistent:
            return declared
        looks = "text" if guess in _TEXT_FORMATS else "binary"
        raise FormatError(f"the file was declared as {_NAMES[declared]}, but its content is "
                          f"{looks} that looks like {_NAMES[guess]}", code="format_mismatch")
    return ext_fmt if ext_fmt in consistent and guess not in ("csv", "tsv") else guess


# --- reading ---------------------------------------------------------------------------------


def _check_utf8(path: Path) -> None:
    """Raise FormatError at the first byte that is not UTF-8 (a BOM is valid UTF-8)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = newlines = 0
    with path.open("rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            pending = decoder.getstate()[0]  # an incomplete sequence held from the last chunk
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                byte = offset - len(pending) + e.start
                line = newlines + (pending + chunk)[: e.start].count(b"\n") + 1
                raise FormatError(f"not valid UTF-8 at byte {byte:,} (line {line:,}); save the "
                                  "file as UTF-8", location={"byte": byte, "line": line}) from None
            if not chunk:
                return
            offset += len(chunk)
            newlines += chunk.count(b"\n")


@dataclass
class _Plan:
    """How to read a file, refined when a streaming read finds its first guess was wrong."""

    string_columns: set[str] = field(default_factory=set)
    block_size: int = _BLOCK
    json_by_blocks: bool = False


class _Retry(Exception):
    """Raised mid-read: start again with the plan changed (a column read as strings, bigger
    blocks, or JSON Lines read block by block with types unified over the whole file)."""

    def __init__(self, column: str | None = None, *, bigger_block: bool = False) -> None:
        super().__init__(column)
        self.column, self.bigger_block = column, bigger_block

    def apply(self, plan: _Plan) -> None:
        if self.column is not None:
            plan.string_columns.add(self.column)
        elif self.bigger_block:
            plan.block_size *= 4
        else:
            plan.json_by_blocks = True


def _streamed(reader: Any, failure: Callable[[Exception], NoReturn]) -> Iterator[pa.RecordBatch]:
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except pa.ArrowException as e:
            failure(e)
        yield batch


def _csv_records(path: Path, fmt: str) -> Iterator[tuple[int, int, list[str]]]:
    """(row, first line, fields) of each non-empty record, by the csv module: slow, so used for the
    header and to locate errors that pyarrow reports without a line."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t" if fmt == "tsv" else ",", quotechar='"')
        row = last_line = 0
        for record in reader:
            start, last_line = last_line + 1, reader.line_num
            if record:  # pyarrow skips empty lines too
                row += 1
                yield row, start, record


def _csv_header(path: Path, fmt: str) -> list[str]:
    name = _NAMES[fmt]
    try:
        _, line, header = next(_csv_records(path, fmt))
    except StopIteration:
        raise FormatError(f"the {name} file has no header row", code="empty_file") from None
    except (csv.Error, UnicodeDecodeError) as e:
        _check_utf8(path)  # raises, with the place, if that is what is wrong
        raise FormatError(f"{name} header cannot be read: {e}", location={"line": 1}) from None
    seen: dict[str, int] = {}
    for i, col in enumerate(header, 1):
        if not col.strip():
            raise FormatError(f"{name} header column {i} has no name; every column needs one",
                              location={"line": line, "column": i})
        if col in seen:
            raise FormatError(f"{name} header names the column {col!r} twice (columns "
                              f"{seen[col]} and {i})", location={"line": line, "column": col})
        seen[col] = i
    return header


def _csv_failure(e: Exception, path: Path, fmt: str, header: list[str], plan: _Plan) -> NoReturn:
    text, name = str(e), _NAMES[fmt]
    column = re.search(r"In CSV column #(\d+): .*conversion error", text)
    if column and int(column[1]) < len(header) and header[int(column[1])] not in (
            plan.string_columns):
        # Types come from the first block; a later value of another type makes the column a
        # string column, which needs a fresh read.
        raise _Retry(header[int(column[1])])
    if "straddl" in text and plan.block_size < _MAX_BLOCK:
        raise _Retry(bigger_block=True)
    if "straddl" in text:
        raise FormatError(f"a {name} row is longer than {_MAX_BLOCK >> 20} MB") from None
    if counts := re.search(r"Expected (\d+) columns, got (\d+)", text):
        try:
            found = next((r for r in _csv_records(path, fmt) if len(r[2]) != len(header)), None)
        except (csv.Error, UnicodeDecodeError):
            found = None
        if found:
            row, line, fields = found
            raise FormatError(f"{name} row {row:,} (line {line:,}) has {len(fields)} fields; the "
                              f"header has {len(header)}", location={"row": row, "line": line}
                              ) from None
        raise FormatError(f"{name} has a row with {counts[2]} fields; the header has "
                          f"{counts[1]}: {text.split(': ', 2)[-1][:200]}") from None
    raise FormatError(f"not valid {name}: {text}") from None


def _open_csv(path: Path, fmt: str, plan: _Plan) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    header = _csv_header(path, fmt)
    try:
        reader = pacsv.open_csv(
            path, read_options=pacsv.ReadOptions(block_size=plan.block_size),
            parse_options=pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",",
                                             newlines_in_values=True),  # RFC 4180 quoting
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in plan.string_columns}))
    except pa.ArrowException as e:
        if "Empty CSV file" in str(e):  # a header without a line end, and no rows
            return pa.schema([(c, pa.string()) for c in header]), iter(())
        _csv_failure(e, path, fmt, header, plan)
    return reader.schema, _streamed(reader, lambda e: _csv_failure(e, path, fmt, header, plan))


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


class _Columns:
    """Arrow types for columns of JSON objects, unified part by part. A column whose values do
    not share a type becomes a string column holding the JSON text of its non-string values."""

    def __init__(self) -> None:
        self.types: dict[str, pa.DataType] = {}
        self.as_json: set[str] = set()

    def _unify(self, key: str, new: Callable[[], pa.DataType]) -> None:
        if key in self.as_json:
            return
        current = self.types.get(key)
        try:
            self.types[key] = new() if current is None else pa.unify_schemas(
                [pa.schema([(key, current)]), pa.schema([(key, new())])],
                promote_options="permissive").field(0).type
        except _ARROW_ERRORS:
            self.types[key] = pa.string()
            self.as_json.add(key)

    def add(self, rows: list[dict[str, Any]]) -> None:
        for key in dict.fromkeys(k for row in rows for k in row):
            self._unify(key, lambda: pa.array([row.get(key) for row in rows]).type)  # noqa: B023

    def merge(self, schema: pa.Schema) -> None:
        for f in schema:
            self._unify(f.name, lambda: f.type)  # noqa: B023

    @property
    def schema(self) -> pa.Schema:
        return pa.schema(list(self.types.items()))

    def batch(self, rows: list[dict[str, Any]]) -> pa.RecordBatch:
        if not self.types:  # a struct array keeps the row count when there are no columns
            return pa.RecordBatch.from_struct_array(pa.array([{}] * len(rows), pa.struct([])))
        arrays = []
        for key, dtype in self.types.items():
            values = [row.get(key) for row in rows]
            if key in self.as_json:
                values = [v if v is None or isinstance(v, str) else orjson.dumps(v).decode()
                          for v in values]
            try:
                arrays.append(pa.array(values, type=dtype))
            except _ARROW_ERRORS:
                try:  # strings that pyarrow's reader took for timestamps elsewhere in the file
                    arrays.append(pa.array(values).cast(dtype))
                except _ARROW_ERRORS as e:
                    raise FormatError(f"column {key!r} has values of incompatible types: {e}",
                                      location={"column": key}) from None
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)


def _json_blocks(path: Path) -> Iterator[tuple[int, bytes]]:
    """(number of its first line, block) for blocks of whole lines of about _BLOCK bytes."""
    with path.open("rb") as f:
        line = 1
        while block := f.read(_BLOCK):
            block += (rest := f.readline(_MAX_LINE))
            if len(rest) == _MAX_LINE and not rest.endswith(b"\n"):
                raise FormatError(f"a line after line {line:,} is longer than "
                                  f"{_MAX_LINE >> 20} MB", location={"line": line})
            yield line, block.removeprefix(codecs.BOM_UTF8) if line == 1 else block
            line += block.count(b"\n")


def _block_records(first_line: int, block: bytes) -> list[dict[str, Any]]:
    """The objects of a block, parsed line by line, which says which line is wrong."""
    records = []
    for number, raw in enumerate(block.split(b"\n"), first_line):
        if raw.strip():
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError as e:
                raise FormatError(f"JSON Lines line {number:,} is not valid JSON: {e.msg} "
                                  f"(column {e.colno})", location={"line": number}) from None
            if not isinstance(record, dict):
                raise FormatError(f"JSON Lines line {number:,} is not a JSON object; it is "
                                  f"{_kind(record)}", location={"line": number})
            records.append(record)
    return records


def _read_block(block: bytes, schema: pa.Schema | None = None) -> pa.Table:
    return pajson.read_json(pa.BufferReader(block),
                            read_options=pajson.ReadOptions(block_size=len(block) + 1),
                            parse_options=pajson.ParseOptions(explicit_schema=schema))


def _open_jsonl(path: Path, plan: _Plan, rows: int) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    if not plan.json_by_blocks:
        # pyarrow's streaming reader is the fastest, but it fixes the schema from its first block:
        # a later new field or type change sends us to reading block by block below.
        def failure(e: Exception) -> NoReturn:
            raise _Retry(bigger_block="straddl" in str(e) and plan.block_size < _MAX_BLOCK)

        try:
            reader = pajson.open_json(
                path, read_options=pajson.ReadOptions(block_size=plan.block_size))
        except pa.ArrowException as e:
            failure(e)
        return reader.schema, _streamed(reader, failure)
    # First pass: each block's types, unified; a block that pyarrow cannot read (types mixed
    # within it, a bad line) is parsed line by line. Second pass: blocks read with the schema.
    columns = _Columns()
    for first_line, block in _json_blocks(path):
        try:
            columns.merge(_read_block(block).schema)
        except pa.ArrowException:
            columns.add(_block_records(first_line, block))

    def batches() -> Iterator[pa.RecordBatch]:
        for first_line, block in _json_blocks(path):
            try:
                if columns.as_json:  # pyarrow cannot turn other JSON values into strings
                    raise pa.ArrowInvalid("mixed types")
                yield from _read_block(block, columns.schema).to_batches(max_chunksize=rows)
            except pa.ArrowException:
                records = _block_records(first_line, block)
                for start in range(0, len(records), rows):
                    yield columns.batch(records[start:start + rows])

    return columns.schema, batches()


def _open_json(path: Path, rows: int, max_bytes: int) -> tuple[pa.Schema,
                                                               Iterator[pa.RecordBatch]]:
    if path.stat().st_size > max_bytes:
        raise FormatError(f"JSON files over {max_bytes >> 20} MB are not supported; use JSON "
                          "Lines", code="too_large")
    try:
        doc = orjson.loads(path.read_bytes().removeprefix(codecs.BOM_UTF8))
    except orjson.JSONDecodeError as e:
        raise FormatError(f"not valid JSON at line {e.lineno:,}, column {e.colno:,}: {e.msg}",
                          location={"line": e.lineno}) from None
    if not isinstance(doc, list):
        raise FormatError(f"a JSON file must be an array of objects; this one is {_kind(doc)}")
    for i, item in enumerate(doc):
        if not isinstance(item, dict):
            raise FormatError(f"item {i + 1:,} of the JSON array is not an object; it is "
                              f"{_kind(item)}", location={"row": i + 1})
    columns = _Columns()
    for start in range(0, len(doc), _ROWS):
        columns.add(doc[start:start + _ROWS])
    return columns.schema, (columns.batch(doc[s:s + rows]) for s in range(0, len(doc), rows))


def _open_parquet(path: Path, rows: int) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    with path.open("rb") as f:
        head, size = f.read(4), f.seek(0, 2)
        f.seek(max(size - 4, 0))
        tail = f.read(4)
    if head != b"PAR1":
        raise FormatError("not valid parquet: the file does not start with the parquet magic")
    if size < 12 or tail != b"PAR1":
        raise FormatError("not valid parquet: footer missing (the file may be truncated)")
    try:
        # Buffered column reads, not whole column chunks, keep memory near a page.
        parquet = pq.ParquetFile(path, buffer_size=_CHUNK, pre_buffer=False)
    except (pa.ArrowException, OSError) as e:
        raise FormatError(f"not valid parquet: {e}") from None

    def batches() -> Iterator[pa.RecordBatch]:
        for group in range(parquet.num_row_groups):
            try:
                yield from parquet.iter_batches(batch_size=rows, row_groups=[group])
            except (pa.ArrowException, OSError) as e:
                raise FormatError(f"not valid parquet: row group {group}: {e}",
                                  location={"row_group": group}) from None

    return parquet.schema_arrow, batches()


_TXT_SCHEMA = pa.schema([("text", pa.string())])


def _open_txt(path: Path, rows: int) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    def batches() -> Iterator[pa.RecordBatch]:
        with path.open("rb") as f:
            lines: list[str] = []
            number = 0
            while raw := f.readline(_MAX_LINE + 1):
                number += 1
                if len(raw) > _MAX_LINE and not raw.endswith(b"\n"):
                    raise FormatError(f"line {number:,} is longer than {_MAX_LINE >> 20} MB",
                                      location={"line": number})
                raw = raw.removeprefix(codecs.BOM_UTF8) if number == 1 else raw
                try:
                    lines.append(raw.removesuffix(b"\n").removesuffix(b"\r").decode())
                except UnicodeDecodeError:
                    _check_utf8(path)  # raises, with the place
                    raise
                if len(lines) >= rows:
                    yield pa.record_batch([pa.array(lines, pa.string())], schema=_TXT_SCHEMA)
                    lines = []
            if lines:
                yield pa.record_batch([pa.array(lines, pa.string())], schema=_TXT_SCHEMA)

    return _TXT_SCHEMA, batches()


def _open(path: Path, fmt: str, plan: _Plan, rows: int,
          max_json_bytes: int) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    if fmt in ("csv", "tsv"):
        return _open_csv(path, fmt, plan)
    if fmt == "jsonl":
        return _open_jsonl(path, plan, rows)
    if fmt == "json":
        return _open_json(path, rows, max_json_bytes)
    if fmt == "parquet":
        return _open_parquet(path, rows)
    return _open_txt(path, rows)


# --- stats -----------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """A value as JSON can hold it: dates ISO strings, decimals strings, bytes base64."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (dt.date, dt.time)):  # datetime is a date
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)  # Decimal, timedelta, ...


def _micro(array: pa.Array) -> pa.Array:
    """Nanosecond times at microseconds: Python's datetime has no nanoseconds."""
    t = array.type
    if pa.types.is_timestamp(t) and t.unit == "ns":
        return array.cast(pa.timestamp("us", t.tz), safe=False)
    if (pa.types.is_time64(t) or pa.types.is_duration(t)) and t.unit == "ns":
        return array.cast(pa.time64("us") if pa.types.is_time64(t) else pa.duration("us"),
                          safe=False)
    return array


def _py_rows(batch: pa.RecordBatch) -> list[dict[str, Any]]:
    if not batch.num_columns:  # rows of empty JSON objects
        return [{} for _ in range(batch.num_rows)]
    columns = [_micro(c) for c in batch.columns]
    rows: list[dict[str, Any]] = pa.RecordBatch.from_arrays(
        columns, names=batch.schema.names).to_pylist()
    return rows


class _ColumnStats:
    def __init__(self, dtype: pa.DataType) -> None:
        self.type, t = dtype, dtype.value_type if pa.types.is_dictionary(dtype) else dtype
        self.kind = (
            "number" if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
            else "string" if pa.types.is_string(t) or pa.types.is_large_string(t)
            else "bool" if pa.types.is_boolean(t)
            else "temporal" if pa.types.is_timestamp(t) or pa.types.is_date(t)
            or pa.types.is_time(t) else "other")
        self.count = self.nulls = self.trues = self.mean_n = 0
        self.total = 0.0
        self.low: Any = None
        self.high: Any = None
        self.hashes: set[int] | None = set()  # None once past the cap

    def _extend(self, bounds: Any) -> None:
        low, high = bounds["min"].as_py(), bounds["max"].as_py()
        if low is not None:
            self.low = low if self.low is None else min(self.low, low)
            self.high = high if self.high is None else max(self.high, high)

    def add(self, array: pa.Array) -> None:
        if pa.types.is_dictionary(array.type):
            array = array.dictionary_decode()
        array, nulls = _micro(array), array.null_count
        self.nulls += nulls
        self.count += len(array) - nulls
        if len(array) == nulls or self.kind == "other":
            return
        if self.kind in ("number", "temporal"):
            self._extend(pc.min_max(array))
        if self.kind == "number":
            if pa.types.is_floating(array.type):  # NaN and inf would swamp the mean
                array = array.filter(pc.is_finite(array))
            try:
                self.total += pc.sum(array.cast(pa.float64(), safe=False)).as_py() or 0.0
                self.mean_n += len(array) - array.null_count
            except pa.ArrowException:
                pass
        elif self.kind == "string":
            self._extend(pc.min_max(pc.utf8_length(array)))
            if self.hashes is not None:
                # Hashes, not the strings: memory stays small however long the values are.
                self.hashes.update(hash(v) for v in pc.unique(array.drop_null()).to_pylist())
                if len(self.hashes) > _DISTINCT_CAP:
                    self.hashes = None
        elif self.kind == "bool":
            self.trues += pc.sum(array).as_py() or 0

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": str(self.type), "count": self.count, "nulls": self.nulls}
        if self.kind in ("number", "temporal"):
            out.update(min=_jsonable(self.low), max=_jsonable(self.high))
        if self.kind == "number":
            out["mean"] = self.total / self.mean_n if self.mean_n else None
        elif self.kind == "string":
            out.update(min_length=self.low, max_length=self.high, distinct=f"{_DISTINCT_CAP}+"
                       if self.hashes is None else len(self.hashes))
        elif self.kind == "bool":
            out.update(true=self.trues, false=self.count - self.trues)
        return out


class _Summary:
    def __init__(self, schema: pa.Schema, preview_rows: int) -> None:
        self.schema, self.preview_rows, self.rows = schema, preview_rows, 0
        self.preview: list[dict[str, Any]] = []
        self.columns = [_ColumnStats(f.type) for f in schema]

    def add(self, batch: pa.RecordBatch) -> None:
        self.rows += batch.num_rows
        if len(self.preview) < self.preview_rows:
            head = _py_rows(batch.slice(0, self.preview_rows - len(self.preview)))
            self.preview.extend(_jsonable(row) for row in head)
        for stats, column in zip(self.columns, batch.columns, strict=True):
            stats.add(column)

    def analysis(self, fmt: str) -> Analysis:
        return Analysis(
            format=fmt, content_type=CONTENT_TYPES[fmt], row_count=self.rows,
            schema=[{"name": f.name, "type": str(f.type)} for f in self.schema],
            stats={f.name: s.result() for f, s in zip(self.schema, self.columns, strict=True)},
            preview=self.preview)


def _read(path: Path, fmt: str, max_json_bytes: int, preview_rows: int | None) -> tuple[
        _Plan, _Summary | None]:
    """Read the whole file, again with a refined plan until a read goes through; summarize it
    unless preview_rows is None (a pass that only settles the plan)."""
    plan = _Plan()
    while True:
        if preview_rows is None and plan.json_by_blocks:  # that reader settles types itself
            return plan, None
        try:
            schema, batches = _open(path, fmt, plan, _ROWS, max_json_bytes)
            summary = _Summary(schema, preview_rows or 0)
            for batch in batches:
                if preview_rows is not None:
                    summary.add(batch)
            return plan, summary
        except _Retry as retry:
            retry.apply(plan)


# --- zip -------------------------------------------------------------------------------------


def _unsafe(message: str, name: str) -> FormatError:
    return FormatError(message, location={"member": name}, code="unsafe_archive")


def _check_entry(info: zipfile.ZipInfo, limits: ZipLimits) -> None:
    name = info.filename
    if "\\" in name or name.startswith("/") or re.match(r"[A-Za-z]:", name) or ".." in (
            name.split("/")):
        raise _unsafe(f"the zip entry '{name}' points outside the archive (absolute path, '..', "
                      "drive letter or backslash)", name)
    if (info.external_attr >> 16) & 0o170000 == 0o120000:
        raise _unsafe(f"the zip entry '{name}' is a symbolic link", name)
    if name.lower().endswith(".zip"):
        raise _unsafe(f"the zip entry '{name}' is a zip; nested archives are not supported", name)
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > _RATIO_FLOOR and ratio > limits.max_ratio:
        raise _unsafe(f"the zip entry '{name}' expands {ratio:,.0f} times, over the limit of "
                      f"{limits.max_ratio:,.0f} (a zip bomb?)", name)
    if info.flag_bits & 0x1:
        raise FormatError(f"the zip entry '{name}' is encrypted", location={"member": name})


def _extract(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, limits: ZipLimits,
             used: int) -> int:
    """Copy a member out, counting the bytes it really expands to: declared sizes can lie."""
    name, written = info.filename, 0
    errors = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError,
              ValueError, OSError)
    try:
        src = zf.open(info)
    except errors as e:
        raise FormatError(f"zip member '{name}' cannot be read: {e}",
                          location={"member": name}) from None
    with src, target.open("wb") as dst:
        while True:
            try:
                chunk = src.read(_CHUNK)
            except errors as e:
                raise FormatError(f"zip member '{name}' is corrupt: {e}",
                                  location={"member": name}) from None
            if not chunk:
                return written
            written += len(chunk)
            if written > info.file_size:
                raise _unsafe(f"zip member '{name}' is larger than its declared size", name)
            if used + written > limits.max_total_uncompressed:
                raise _unsafe("the zip archive expands past the limit of "
                              f"{limits.max_total_uncompressed:,} bytes", name)
            if written > _RATIO_FLOOR and written > limits.max_ratio * max(info.compress_size, 1):
                raise _unsafe(f"zip member '{name}' expands more than {limits.max_ratio:,.0f} "
                              "times (a zip bomb?)", name)
            dst.write(chunk)


def _analyze_zip(path: Path, preview_rows: int, limits: ZipLimits,
                 max_json_bytes: int) -> Analysis:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise FormatError(f"not a valid zip archive: {e}") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_members:
            raise FormatError(f"the zip archive has {len(infos):,} entries, over the limit of "
                              f"{limits.max_members:,}", code="unsafe_archive")
        for info in infos:
            _check_entry(info, limits)
        if (declared := sum(i.file_size for i in infos)) > limits.max_total_uncompressed:
            raise FormatError(f"the zip archive expands to {declared:,} bytes, over the limit of "
                              f"{limits.max_total_uncompressed:,}", code="unsafe_archive")
        data = [i for i in infos if not i.is_dir() and not i.filename.startswith("__MACOSX/")
                and i.filename.rsplit("/", 1)[-1] != ".DS_Store"]  # macOS zip droppings
        members: list[dict[str, Any]] = []
        first: Analysis | None = None
        used = 0
        # Next to the upload rather than in /tmp, which may be a small RAM disk.
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".unzip-") as tmp:
            for index, info in enumerate(data):
                name, suffix = info.filename, Path(info.filename).suffix.lower()
                if suffix and _EXTENSIONS.get(suffix) in (None, "zip"):
                    raise FormatError(f"zip member '{name}' has an unsupported file type "
                                      f"({suffix})", location={"member": name},
                                      code="unsupported_type")
                target = Path(tmp) / f"member-{index}"  # never a path made from the name
                size = _extract(zf, info, target, limits, used)
                used += size
                try:
                    fmt = detect_format(target, name)
                    if fmt == "zip":
                        raise _unsafe(f"zip member '{name}' is a zip; nested archives are not "
                                      "supported", name)
                    result = analyze(target, fmt, preview_rows=preview_rows,
                                     max_json_bytes=max_json_bytes)
                except FormatError as e:
                    raise FormatError(f"zip member '{name}': {e.message}", code=e.code,
                                      location={"member": name, **e.location}) from None
                finally:
                    target.unlink(missing_ok=True)
                first = first or result
                members.append({"name": name, "format": fmt, "size": size,
                                "row_count": result.row_count, "schema": result.schema})
    if first is None:
        raise FormatError("the zip archive has no data files", code="empty_file")
    return Analysis(format="zip", content_type=CONTENT_TYPES["zip"], schema=first.schema,
                    row_count=sum(m["row_count"] for m in members), stats=first.stats,
                    preview=first.preview, members=members)


# --- public API ------------------------------------------------------------------------------


def analyze(path: Path, fmt: str, *, preview_rows: int = 20, zip_limits: ZipLimits | None = None,
            max_json_bytes: int = 256 << 20) -> Analysis:
    """Validate the whole file as `fmt` and analyze it; FormatError says what broke and where."""
    _require_format(fmt)
    path = Path(path)
    if fmt == "zip":
        return _analyze_zip(path, preview_rows, zip_limits or ZipLimits(), max_json_bytes)
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


class BatchWriter:
    """Writes record batches as a file of `fmt`: csv/tsv with a header, jsonl, a json array,
    parquet, or txt (one column, one value per line); also a context manager."""

    def __init__(self, path: Path, fmt: str, schema: pa.Schema) -> None:
        _require_format(fmt)
        if fmt == "zip" or (fmt == "txt" and len(schema) != 1):
            raise FormatError("cannot write a zip archive" if fmt == "zip" else
                              f"a txt file has one column; this schema has {len(schema)}",
                              code="unsupported_operation")
        self.path, self.fmt, self.schema = Path(path), fmt, schema
        self._arrow: Any = None  # pyarrow's CSV or parquet writer
        self._file: IO[bytes] | None = None
        self._rows = 0
        if fmt in ("csv", "tsv"):
            self._arrow = pacsv.CSVWriter(self.path, schema, write_options=pacsv.WriteOptions(
                include_header=True, delimiter="\t" if fmt == "tsv" else ","))
        elif fmt == "parquet":
            self._arrow = pq.ParquetWriter(self.path, schema)
        else:
            self._file = self.path.open("wb")
            self._file.write(b"[" if fmt == "json" else b"")

    def write(self, batch: pa.RecordBatch) -> None:
        if self._arrow is None and self._file is None:
            raise ValueError("the writer is closed")
        if not batch.schema.equals(self.schema):
            batch = batch.cast(self.schema)
        if self._arrow is not None:
            self._arrow.write_batch(batch)
        elif self._file is not None and self.fmt == "txt":
            values = batch.column(0).to_pylist()
            self._file.write("".join(f"{'' if v is None else v}\n" for v in values).encode())
        elif self._file is not None and self.fmt == "jsonl":
            self._file.write(b"".join(orjson.dumps(_jsonable(r), option=orjson.OPT_APPEND_NEWLINE)
                                      for r in _py_rows(batch)))
        elif self._file is not None and batch.num_rows:
            self._file.write((b",\n" if self._rows else b"\n") + b",\n".join(
                orjson.dumps(_jsonable(r)) for r in _py_rows(batch)))
        self._rows += batch.num_rows

    def close(self) -> None:
        if self._arrow is not None:
            self._arrow.close()
            self._arrow = None
        if self._file is not None:
            self._file.write((b"\n]\n" if self._rows else b"]\n") if self.fmt == "json" else b"")
            self._file.close()
            self._file = None

    def __enter__(self) -> BatchWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
