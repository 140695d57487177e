"""BatchWriter: writes record batches as a file of any format but zip."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import IO, Any

import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from services.data.formats.common import FormatError, _require_format
from services.data.formats.summary import _jsonable, _py_rows


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
