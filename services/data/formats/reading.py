"""The per-format readers: stream a file's rows as Arrow record batches, with errors that say
where, and a plan that is refined when a streaming read finds its first guess was wrong."""

from __future__ import annotations

import codecs
import csv
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from services.data.formats.common import (
    _ARROW_ERRORS,
    _BLOCK,
    _CHUNK,
    _MAX_BLOCK,
    _MAX_LINE,
    _NAMES,
    _ROWS,
    FormatError,
)


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
