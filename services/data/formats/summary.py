"""Column statistics, JSON-safe preview values and the read pass that validates and summarizes a
whole file."""

from __future__ import annotations

import base64
import datetime as dt
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from services.data.formats.common import _DISTINCT_CAP, _ROWS, CONTENT_TYPES, Analysis
from services.data.formats.reading import _open, _Plan, _Retry


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
