"""Dataset formats: detection, analysis, errors that say where, zip safety, streaming, writing."""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import json
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.data.formats import (
    CONTENT_TYPES,
    FORMATS,
    BatchWriter,
    FormatError,
    ZipLimits,
    analyze,
    detect_format,
    iter_batches,
)

REPO = Path(__file__).resolve().parents[3]


def put(tmp_path: Path, name: str, data: bytes | str) -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def parquet_bytes(tmp_path: Path, table: pa.Table | None = None) -> bytes:
    path = tmp_path / "_scratch.parquet"
    pq.write_table(table if table is not None else pa.table({"a": list(range(100))}), path)
    data = path.read_bytes()
    path.unlink()
    return data


def zip_bytes(tmp_path: Path, members: dict[str, bytes | str]) -> bytes:
    path = tmp_path / "_scratch.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    data = path.read_bytes()
    path.unlink()
    return data


@contextlib.contextmanager
def raises(code: str, *words: str) -> Iterator[pytest.ExceptionInfo[FormatError]]:
    """pytest.raises for a FormatError, then checks its code and the words of its message."""
    with pytest.raises(FormatError) as info:
        yield info
    assert info.value.code == code, info.value.message
    for word in words:
        assert word in info.value.message, info.value.message


def rows_of(path: Path, fmt: str) -> list[dict[str, Any]]:
    return [row for batch in iter_batches(path, fmt) for row in batch.to_pylist()]


# --- detection -------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "data", "expected"), [
    ("a.csv", "a,b\n1,2\n", "csv"),
    ("a.tsv", "a\tb\n1\t2\n", "tsv"),
    (None, "a,b\n1,2\n", "csv"),
    (None, "a\tb\n1\t2\n", "tsv"),
    ("tab-separated.csv", "a\tb\n1\t2\n", "tsv"),  # the header's delimiters beat the extension
    ("a.jsonl", '{"a": 1}\n{"a": 2}\n', "jsonl"),
    ("a.csv", '{"a": 1}\n{"a": 2}\n', "jsonl"),  # the content beats the extension
    (None, '{"a": 1}\n', "jsonl"),
    ("a.json", '{"a": 1}\n', "json"),  # one object: the extension decides
    ("a.json", '[{"a": 1}]', "json"),
    (None, '\n  [{"a": 1}]', "json"),
    ("notes.txt", "hello, world\nsecond line\n", "txt"),
    (None, "just some words\nmore words\n", "txt"),
    ("single.csv", "name\nalice\n", "csv"),
    ("a.bin", "\ufeffa,b\n1,2\n", "csv"),
])
def test_detect_text_formats(tmp_path: Path, name: str | None, data: str, expected: str) -> None:
    assert detect_format(put(tmp_path, "upload", data), name) == expected


def test_detect_binary_formats_by_magic(tmp_path: Path) -> None:
    assert detect_format(put(tmp_path, "x", parquet_bytes(tmp_path)), "data.csv") == "parquet"
    assert detect_format(put(tmp_path, "y", zip_bytes(tmp_path, {"a.csv": "a\n1\n"})),
                         None) == "zip"
    # A truncated parquet is still parquet, so that analysis can say it is truncated.
    assert detect_format(put(tmp_path, "z", parquet_bytes(tmp_path)[:50]), None) == "parquet"


def test_detect_declared_wins_when_consistent(tmp_path: Path) -> None:
    path = put(tmp_path, "a.csv", "a,b\n1,2\n")
    assert detect_format(path, "a.csv", declared="txt") == "txt"
    assert detect_format(path, "a.csv", declared="tsv") == "tsv"
    one = put(tmp_path, "one", '{"a": 1}\n')
    assert detect_format(one, None, declared="json") == "json"


@pytest.mark.parametrize(("data", "declared", "words"), [
    ("a,b\n1,2\n", "parquet", ("Parquet", "CSV", "text")),
    ("a,b\n1,2\n", "jsonl", ("JSON Lines", "CSV")),
    ('{"a": 1}\n{"a": 2}\n', "json", ("JSON", "JSON Lines")),
    ('[{"a": 1}]', "csv", ("CSV", "JSON")),
])
def test_detect_declared_mismatch(tmp_path: Path, data: str, declared: str,
                                  words: tuple[str, ...]) -> None:
    with raises("format_mismatch", *words):
        detect_format(put(tmp_path, "f", data), None, declared=declared)


def test_detect_declared_text_format_on_parquet_is_a_mismatch(tmp_path: Path) -> None:
    with raises("format_mismatch", "CSV", "Parquet"):
        detect_format(put(tmp_path, "f", parquet_bytes(tmp_path)), "f.csv", declared="csv")


@pytest.mark.parametrize("data", [b"", b"   \n\t\r\n", b"\xef\xbb\xbf", b"\n" * 100_000])
def test_detect_empty(tmp_path: Path, data: bytes) -> None:
    with raises("empty_file", "empty"):
        detect_format(put(tmp_path, "f.csv", data), "f.csv")


def test_detect_unsupported_binary(tmp_path: Path) -> None:
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))
    with raises("unsupported_type", "unsupported file type", "PNG"):
        detect_format(put(tmp_path, "a.csv", png), "a.csv")
    with raises("unsupported_type", "binary"):
        detect_format(put(tmp_path, "b", b"\x01\x02\x00\x00" * 100), None)
    with raises("unsupported_type", "UTF-16"):
        detect_format(put(tmp_path, "c", "a,b\n".encode("utf-16")), "c.csv")
    with raises("unsupported_format", "unknown format"):
        detect_format(put(tmp_path, "d", "a\n"), None, declared="xlsx")


# --- analysis --------------------------------------------------------------------------------


CSV = """id,score,name,active,note
1,1.5,alice,true,
2,2.5,bob,false,x
3,,carol,true,
4,4.0,alice,,y
"""


def check_people(a: Any, fmt: str) -> None:
    assert a.format == fmt
    assert a.content_type == CONTENT_TYPES[fmt]
    assert a.row_count == 4
    types = {c["name"]: c["type"] for c in a.schema}
    assert types["id"] == "int64" and types["score"] == "double" and types["active"] == "bool"
    assert types["name"] == "string"
    s = a.stats
    assert s["id"] == {"type": "int64", "count": 4, "nulls": 0, "min": 1, "max": 4, "mean": 2.5}
    assert s["score"]["nulls"] == 1 and s["score"]["count"] == 3
    assert s["score"]["min"] == 1.5 and s["score"]["max"] == 4.0
    assert s["score"]["mean"] == pytest.approx(8.0 / 3)
    assert s["name"] == {"type": "string", "count": 4, "nulls": 0, "min_length": 3,
                         "max_length": 5, "distinct": 3}
    assert s["active"]["true"] == 2 and s["active"]["false"] == 1 and s["active"]["nulls"] == 1
    assert a.preview[0]["id"] == 1 and a.preview[0]["name"] == "alice"
    assert [r["name"] for r in a.preview] == ["alice", "bob", "carol", "alice"]
    json.dumps(a.preview)
    json.dumps(a.stats)


def test_analyze_csv(tmp_path: Path) -> None:
    a = analyze(put(tmp_path, "p.csv", CSV), "csv")
    check_people(a, "csv")
    assert a.members is None
    assert a.preview[1]["note"] == "x"
    assert len(analyze(put(tmp_path, "q.csv", CSV), "csv", preview_rows=2).preview) == 2


def test_analyze_tsv(tmp_path: Path) -> None:
    check_people(analyze(put(tmp_path, "p.tsv", CSV.replace(",", "\t")), "tsv"), "tsv")


def test_analyze_csv_quoting_and_bom(tmp_path: Path) -> None:
    data = '\ufeffa,b\r\n"x, ""y""","multi\r\nline"\r\nplain,2\r\n'
    a = analyze(put(tmp_path, "q.csv", data), "csv")
    assert [c["name"] for c in a.schema] == ["a", "b"]
    assert a.row_count == 2
    assert a.preview[0] == {"a": 'x, "y"', "b": "multi\r\nline"}


def test_analyze_jsonl(tmp_path: Path) -> None:
    lines = [json.dumps({"id": i, "score": [1.5, 2.5, None, 4.0][i - 1],
                         "name": ["alice", "bob", "carol", "alice"][i - 1],
                         "active": [True, False, True, None][i - 1]}) for i in range(1, 5)]
    data = "\n".join(lines[:2]) + "\n\n   \n" + "\n".join(lines[2:]) + "\n"  # blank lines ignored
    a = analyze(put(tmp_path, "p.jsonl", data), "jsonl")
    assert a.row_count == 4
    assert a.stats["id"]["mean"] == 2.5
    assert a.stats["name"]["distinct"] == 3
    assert a.stats["active"]["true"] == 2
    assert a.preview[3] == {"id": 4, "score": 4.0, "name": "alice", "active": None}


def test_analyze_jsonl_with_changing_types_and_new_fields(tmp_path: Path) -> None:
    data = '{"a": 1}\n{"a": 2.5}\n{"a": 3, "b": "x"}\n{"a": 4, "c": 1}\n{"a": 5, "c": "two"}\n'
    a = analyze(put(tmp_path, "p.jsonl", data), "jsonl")
    types = {c["name"]: c["type"] for c in a.schema}
    assert types == {"a": "double", "b": "string", "c": "string"}
    assert a.row_count == 5
    assert [r["c"] for r in a.preview] == [None, None, None, "1", "two"]
    assert a.stats["a"]["max"] == 5.0


def test_analyze_jsonl_new_field_in_a_later_block(tmp_path: Path) -> None:
    # pyarrow fixes the schema from its first block; a field that appears after it needs our reader.
    data = '{"a": 1}\n' * 200_000 + '{"a": 2, "late": "yes"}\n'  # 1.8 MB, blocks of 512 KB
    path = put(tmp_path, "p.jsonl", data)
    a = analyze(path, "jsonl")
    assert a.row_count == 200_001
    assert {c["name"] for c in a.schema} == {"a", "late"}
    assert a.stats["late"]["count"] == 1
    batches = list(iter_batches(path, "jsonl", batch_rows=50_000))
    assert all(b.schema.names == ["a", "late"] for b in batches)
    assert sum(b.num_rows for b in batches) == 200_001


def test_analyze_json(tmp_path: Path) -> None:
    data = [{"id": 1, "tags": ["x"], "meta": {"k": 1}}, {"id": 2, "tags": [], "extra": True}]
    a = analyze(put(tmp_path, "p.json", json.dumps(data)), "json")
    assert a.row_count == 2
    assert [c["name"] for c in a.schema] == ["id", "tags", "meta", "extra"]
    assert a.preview[1] == {"id": 2, "tags": [], "meta": None, "extra": True}
    assert a.stats["extra"] == {"type": "bool", "count": 1, "nulls": 1, "true": 1, "false": 0}
    empty = analyze(put(tmp_path, "e.json", "[]"), "json")
    assert empty.row_count == 0 and empty.schema == []


def test_analyze_parquet(tmp_path: Path) -> None:
    table = pa.table({
        "n": pa.array([3, 1, None, 2], pa.int32()),
        "when": pa.array([1_577_836_800_123_456_789, None, 0, 1], pa.timestamp("ns")),
        "day": pa.array([dt.date(2024, 1, 2), dt.date(2023, 5, 6), None, None]),
        "price": pa.array([decimal.Decimal("1.25"), None, decimal.Decimal("-3.50"), None],
                          pa.decimal128(5, 2)),
        "blob": pa.array([b"\x00\xff", None, b"ok", b""]),
        "label": pa.array(["a", "b", "a", None]).dictionary_encode(),
    })
    a = analyze(put(tmp_path, "p.parquet", parquet_bytes(tmp_path, table)), "parquet")
    assert a.row_count == 4
    assert {c["name"]: c["type"] for c in a.schema}["n"] == "int32"
    assert a.stats["n"]["min"] == 1 and a.stats["n"]["max"] == 3 and a.stats["n"]["mean"] == 2
    assert a.stats["day"]["min"] == "2023-05-06" and a.stats["day"]["max"] == "2024-01-02"
    assert a.stats["price"]["min"] == "-3.50" and a.stats["price"]["max"] == "1.25"
    assert a.stats["label"]["distinct"] == 2
    assert a.preview[0]["when"] == "2020-01-01T00:00:00.123456"
    assert a.preview[0]["price"] == "1.25"
    assert a.preview[0]["blob"] == "AP8="
    json.dumps({"stats": a.stats, "preview": a.preview}, allow_nan=False)


def test_analyze_txt(tmp_path: Path) -> None:
    data = "\ufefffirst line\r\nsecond\n\nfourth is last".encode()
    a = analyze(put(tmp_path, "p.txt", data), "txt")
    assert a.schema == [{"name": "text", "type": "string"}]
    assert a.row_count == 4
    assert [r["text"] for r in a.preview] == ["first line", "second", "", "fourth is last"]
    assert a.stats["text"]["min_length"] == 0 and a.stats["text"]["max_length"] == 14


def test_distinct_is_exact_up_to_the_cap(tmp_path: Path) -> None:
    few = "s\n" + "".join(f"v{i % 10_000}\n" for i in range(30_000))
    assert analyze(put(tmp_path, "a.csv", few), "csv").stats["s"]["distinct"] == 10_000
    many = "s\n" + "".join(f"v{i}\n" for i in range(10_001))
    assert analyze(put(tmp_path, "b.csv", many), "csv").stats["s"]["distinct"] == "10000+"


def test_analyze_zip_of_csv_and_jsonl(tmp_path: Path) -> None:
    members: dict[str, bytes | str] = {
        "data/": "",
        "data/people.csv": CSV,
        "data/more.jsonl": '{"x": 1}\n{"x": 2}\n{"x": 3}\n',
        "__MACOSX/data/._people.csv": b"\x00\x05\x16\x07",
    }
    a = analyze(put(tmp_path, "a.zip", zip_bytes(tmp_path, members)), "zip")
    assert a.format == "zip" and a.content_type == "application/zip"
    assert a.row_count == 7
    assert a.schema[0] == {"name": "id", "type": "int64"}
    assert a.stats["id"]["max"] == 4
    assert a.preview[0]["name"] == "alice"
    assert a.members is not None
    assert [(m["name"], m["format"], m["row_count"]) for m in a.members] == [
        ("data/people.csv", "csv", 4), ("data/more.jsonl", "jsonl", 3)]
    assert a.members[0]["size"] == len(CSV)
    assert a.members[1]["schema"] == [{"name": "x", "type": "int64"}]


def test_csv_column_that_changes_type_late_becomes_string(tmp_path: Path) -> None:
    # Several 512 KB read blocks of integers before the first string, so pyarrow has already typed
    # the column int64 when it meets it.
    rows = "".join(f"{i},{i * 2}\n" for i in range(500_000))
    path = put(tmp_path, "m.csv", "a,b\n" + rows + "oops,7\n" + "8,9\n")
    a = analyze(path, "csv")
    assert {c["name"]: c["type"] for c in a.schema} == {"a": "string", "b": "int64"}
    assert a.row_count == 500_002
    assert a.stats["b"]["max"] == 999_998
    batches = list(iter_batches(path, "csv", batch_rows=100_000))
    assert all(b.schema.field("a").type == pa.string() for b in batches)
    assert sum(b.num_rows for b in batches) == 500_002
    assert batches[-1].to_pylist()[-2:] == [{"a": "oops", "b": 7}, {"a": "8", "b": 9}]


def test_rows_longer_than_a_read_block(tmp_path: Path) -> None:
    big = "x" * 1_500_000
    a = analyze(put(tmp_path, "l.csv", f"a,b\n1,{big}\n2,y\n"), "csv")
    assert a.row_count == 2 and a.stats["b"]["max_length"] == 1_500_000
    data = json.dumps({"a": 1, "b": big}) + "\n" + '{"a": 2, "b": "y"}\n'
    a = analyze(put(tmp_path, "l.jsonl", data), "jsonl")
    assert a.row_count == 2 and a.stats["b"]["max_length"] == 1_500_000


def test_jsonl_integers_then_a_float_in_a_later_block(tmp_path: Path) -> None:
    path = put(tmp_path, "f.jsonl", '{"n": 1}\r\n' * 100_000 + '{"n": 1.5}\r\n')
    a = analyze(path, "jsonl")
    assert a.schema == [{"name": "n", "type": "double"}]
    assert a.row_count == 100_001 and a.stats["n"]["max"] == 1.5
    assert rows_of(path, "jsonl")[-2:] == [{"n": 1.0}, {"n": 1.5}]


def test_csv_header_only(tmp_path: Path) -> None:
    assert analyze(put(tmp_path, "h.csv", "a,b\n"), "csv").row_count == 0
    a = analyze(put(tmp_path, "g.csv", "a,b"), "csv")
    assert a.row_count == 0 and [c["name"] for c in a.schema] == ["a", "b"]


# --- bad inputs ------------------------------------------------------------------------------


def test_truncated_parquet(tmp_path: Path) -> None:
    data = parquet_bytes(tmp_path, pa.table({"a": list(range(10_000))}))
    with raises("invalid_file", "not valid parquet", "truncated"):
        analyze(put(tmp_path, "t.parquet", data[: len(data) // 2]), "parquet")
    with raises("invalid_file", "not valid parquet"):
        analyze(put(tmp_path, "u.parquet", data[:-40] + b"PAR1"), "parquet")


def test_corrupt_parquet_pages(tmp_path: Path) -> None:
    data = parquet_bytes(tmp_path, pa.table({"a": [f"value {i}" for i in range(5_000)]}))
    broken = data[:100] + b"\xff" * 400 + data[500:]
    with raises("invalid_file", "not valid parquet") as info:
        analyze(put(tmp_path, "c.parquet", broken), "parquet")
    assert info.value.location.get("row_group", 0) == 0


def test_csv_ragged_rows(tmp_path: Path) -> None:
    with raises("invalid_file", "CSV row 3 (line 3) has 4 fields; the header has 3") as info:
        analyze(put(tmp_path, "r.csv", "a,b,c\n1,2,3\n4,5,6,7\n8,9,10\n"), "csv")
    assert info.value.location == {"row": 3, "line": 3}
    # A quoted value over two lines makes lines and rows differ; too few fields also fails.
    data = 'a,b\n1,"two\nlines"\n\n3,4\n5\n'
    with raises("invalid_file", "CSV row 4 (line 6) has 1 fields; the header has 2"):
        analyze(put(tmp_path, "s.csv", data), "csv")
    with raises("invalid_file", "TSV row 2 (line 2) has 3 fields"):
        analyze(put(tmp_path, "t.tsv", "a\tb\n1\t2\t3\n"), "tsv")


def test_csv_ragged_row_in_a_later_block(tmp_path: Path) -> None:
    rows = "1,2\n" * 1_500_000
    path = put(tmp_path, "r.csv", "a,b\n" + rows + "1,2,3\n")
    with raises("invalid_file", "CSV row 1,500,002 (line 1,500,002) has 3 fields") as info:
        analyze(path, "csv")
    assert info.value.location["row"] == 1_500_002


def test_csv_bad_header(tmp_path: Path) -> None:
    with raises("invalid_file", "'a' twice", "columns 1 and 3"):
        analyze(put(tmp_path, "d.csv", "a,b,a\n1,2,3\n"), "csv")
    with raises("invalid_file", "column 2 has no name"):
        analyze(put(tmp_path, "e.csv", "a,,c\n1,2,3\n"), "csv")


def test_invalid_utf8_in_csv(tmp_path: Path) -> None:
    data = "a,b\n1,é\n".encode() + b"2,\xff\n"
    with raises("invalid_file", "not valid UTF-8 at byte 11 (line 3)") as info:
        analyze(put(tmp_path, "u.csv", data), "csv")
    assert info.value.location == {"byte": 11, "line": 3}


def test_invalid_utf8_in_txt_across_read_chunks(tmp_path: Path) -> None:
    head = ("x" * 99 + "\n") * 20_000  # 2,000,000 bytes: the bad byte is in the second chunk
    data = head.encode() + "ok é\n".encode() + b"bad \xc3\x28\n"
    with raises("invalid_file", "not valid UTF-8 at byte 2,000,010 (line 20,002)") as info:
        analyze(put(tmp_path, "u.txt", data), "txt")
    assert info.value.location == {"byte": 2_000_010, "line": 20_002}
    # A sequence cut by the chunk boundary is fine; one cut by the end of the file is not.
    boundary = b"a" * ((1 << 20) - 1) + "é\n".encode()
    assert analyze(put(tmp_path, "v.txt", boundary), "txt").row_count == 1
    with raises("invalid_file", "byte 3 (line 1)"):
        analyze(put(tmp_path, "w.txt", b"abc\xe2\x82"), "txt")


def test_iter_batches_reports_invalid_utf8_with_its_place(tmp_path: Path) -> None:
    with raises("invalid_file", "byte 4 (line 2)"):
        list(iter_batches(put(tmp_path, "x.txt", b"abc\n\xff\n"), "txt"))
    with raises("invalid_file", "byte 0 (line 1)"):
        list(iter_batches(put(tmp_path, "x.csv", b"\xff,b\n1,2\n"), "csv"))


def test_empty_files(tmp_path: Path) -> None:
    for fmt in ("csv", "txt", "jsonl", "json", "parquet"):
        with raises("empty_file", "empty"):
            analyze(put(tmp_path, f"e.{fmt}", b""), fmt)
    with raises("empty_file", "empty"):
        analyze(put(tmp_path, "w.csv", "\n \n"), "csv")


def test_json_errors(tmp_path: Path) -> None:
    with raises("invalid_file", "array of objects", "an object"):
        analyze(put(tmp_path, "o.json", '{"rows": [{"a": 1}]}'), "json")
    with raises("invalid_file", "item 2", "not an object") as info:
        analyze(put(tmp_path, "i.json", '[{"a": 1}, 2]'), "json")
    assert info.value.location == {"row": 2}
    with raises("invalid_file", "not valid JSON at line 3") as info:
        analyze(put(tmp_path, "s.json", '[\n{"a": 1},\n{"a": }\n]'), "json")
    assert info.value.location == {"line": 3}
    with raises("too_large", "JSON files over 1 MB are not supported; use JSON Lines"):
        analyze(put(tmp_path, "b.json", "[" + '{"a": 1},' * 200_000 + '{"a": 1}]'), "json",
                max_json_bytes=1 << 20)


def test_jsonl_errors(tmp_path: Path) -> None:
    with raises("invalid_file", "line 3 is not valid JSON") as info:
        analyze(put(tmp_path, "a.jsonl", '{"a": 1}\n{"a": 2}\n{"a": \n{"a": 4}\n'), "jsonl")
    assert info.value.location == {"line": 3}
    with raises("invalid_file", "line 4 is not a JSON object; it is an array") as info:
        analyze(put(tmp_path, "b.jsonl", '{"a": 1}\n\n{"a": 2}\n[1, 2]\n'), "jsonl")
    assert info.value.location == {"line": 4}


def test_unsupported_operations(tmp_path: Path) -> None:
    path = put(tmp_path, "a.zip", zip_bytes(tmp_path, {"a.csv": "a\n1\n"}))
    with raises("unsupported_operation"):
        list(iter_batches(path, "zip"))
    with raises("unsupported_operation"):
        BatchWriter(tmp_path / "x.zip", "zip", pa.schema([("a", pa.int64())]))
    with raises("unsupported_operation", "one column"):
        BatchWriter(tmp_path / "x.txt", "txt", pa.schema([("a", pa.int64()), ("b", pa.int64())]))
    with raises("unsupported_format"):
        analyze(path, "xlsx")


# --- zip safety ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../evil.csv", "ok/../../evil.csv", "/etc/evil.csv",
                                  "C:/evil.csv", "dir\\evil.csv", "inner.zip"])
def test_zip_unsafe_names(tmp_path: Path, name: str) -> None:
    data = zip_bytes(tmp_path, {"fine.csv": "a\n1\n", name: "a\n1\n"})
    with raises("unsafe_archive", name) as info:
        analyze(put(tmp_path, "z.zip", data), "zip")
    assert info.value.location == {"member": name}


def test_zip_symlink(tmp_path: Path) -> None:
    path = tmp_path / "l.zip"
    with zipfile.ZipFile(path, "w") as zf:
        link = zipfile.ZipInfo("link.csv")
        link.external_attr = 0o120777 << 16
        zf.writestr(link, "/etc/passwd")
    with raises("unsafe_archive", "symbolic link"):
        analyze(path, "zip")


def test_zip_nested_by_content(tmp_path: Path) -> None:
    inner = zip_bytes(tmp_path, {"a.csv": "a\n1\n"})
    with raises("unsafe_archive", "nested"):
        analyze(put(tmp_path, "n.zip", zip_bytes(tmp_path, {"inner": inner})), "zip")


def test_zip_limits(tmp_path: Path) -> None:
    path = put(tmp_path, "m.zip", zip_bytes(tmp_path, {f"{i}.csv": "a\n1\n" for i in range(5)}))
    with raises("unsafe_archive", "5 entries"):
        analyze(path, "zip", zip_limits=ZipLimits(max_members=4))
    with raises("unsafe_archive", "over the limit of 10"):
        analyze(path, "zip", zip_limits=ZipLimits(max_total_uncompressed=10))
    assert analyze(path, "zip").row_count == 5


def test_zip_bomb(tmp_path: Path) -> None:
    data = zip_bytes(tmp_path, {"bomb.csv": b"0" * (50 << 20)})
    with raises("unsafe_archive", "zip bomb") as info:
        analyze(put(tmp_path, "b.zip", data), "zip")
    assert info.value.location == {"member": "bomb.csv"}


def test_zip_member_lying_about_its_size(tmp_path: Path) -> None:
    real = ("a,b\n" + "1,2\n" * 500_000).encode()  # 2 MB of highly compressible rows
    data = bytearray(zip_bytes(tmp_path, {"lie.csv": real}))
    declared = (100_000).to_bytes(4, "little")  # claims a ratio well under the limit
    local = data.index(b"PK\x03\x04")
    central = data.index(b"PK\x01\x02")
    data[local + 22:local + 26] = declared
    data[central + 24:central + 28] = declared
    with raises("invalid_file", "lie.csv") as info:
        analyze(put(tmp_path, "l.zip", bytes(data)), "zip")
    assert info.value.location["member"] == "lie.csv"


def test_zip_member_errors_name_the_member(tmp_path: Path) -> None:
    data = zip_bytes(tmp_path, {"good.csv": "a\n1\n", "bad.csv": "a,b\n1,2\n3\n"})
    with raises("invalid_file", "zip member 'bad.csv'", "row 3 (line 3)") as info:
        analyze(put(tmp_path, "z.zip", data), "zip")
    assert info.value.location == {"member": "bad.csv", "row": 3, "line": 3}
    png = zip_bytes(tmp_path, {"image.png": b"\x89PNG\r\n\x1a\n\x00"})
    with raises("unsupported_type", "image.png"):
        analyze(put(tmp_path, "p.zip", png), "zip")
    binary = zip_bytes(tmp_path, {"noext": b"\x89PNG\r\n\x1a\n\x00"})
    with raises("unsupported_type", "noext", "PNG"):
        analyze(put(tmp_path, "q.zip", binary), "zip")
    with raises("empty_file", "no data files"):
        analyze(put(tmp_path, "e.zip", zip_bytes(tmp_path, {"dir/": ""})), "zip")
    with raises("invalid_file", "not a valid zip"):
        analyze(put(tmp_path, "c.zip", b"PK\x03\x04" + b"\x00" * 100), "zip")


# --- streaming and writing -------------------------------------------------------------------


def test_iter_batches_streams_a_csv(tmp_path: Path) -> None:
    path = put(tmp_path, "big.csv", "n,sq\n" + "".join(f"{i},{i * i}\n" for i in range(200_000)))
    batches = list(iter_batches(path, "csv", batch_rows=30_000))
    assert len(batches) >= 7
    assert all(0 < b.num_rows <= 30_000 for b in batches)
    assert sum(b.num_rows for b in batches) == 200_000
    assert sum(pa.compute.sum(b.column("n")).as_py() for b in batches) == sum(range(200_000))


SAMPLE = pa.table({
    "id": pa.array([1, 2, 3, 4, 5], pa.int64()),
    "name": ["alice", "bob", None, "dave, jr.", 'quote "q"'],
    "score": [1.5, None, 3.25, -4.0, 0.0],
    "ok": [True, False, None, True, False],
})


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "json", "parquet"])
def test_batch_writer_round_trip(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"out.{fmt}"
    with BatchWriter(path, fmt, SAMPLE.schema) as writer:
        for batch in SAMPLE.to_batches(max_chunksize=2):
            writer.write(batch)
        writer.write(pa.RecordBatch.from_pylist([], schema=SAMPLE.schema))
    assert detect_format(path, path.name) == fmt
    a = analyze(path, fmt)
    assert a.row_count == 5
    expected = SAMPLE.to_pylist()
    if fmt in ("csv", "tsv"):  # CSV cannot tell a null string from an empty one
        expected[2]["name"] = ""
    assert rows_of(path, fmt) == expected
    assert a.preview == expected


def test_batch_writer_txt_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "out.txt"
    schema = pa.schema([("text", pa.string())])
    with BatchWriter(path, "txt", schema) as writer:
        writer.write(pa.record_batch([pa.array(["one", "", "three"])], schema=schema))
        writer.write(pa.record_batch([pa.array(["four é", None])], schema=schema))
    assert path.read_text() == "one\n\nthree\nfour é\n\n"
    assert rows_of(path, "txt") == [{"text": t} for t in ["one", "", "three", "four é", ""]]
    assert analyze(path, "txt").row_count == 5


def test_batch_writer_json_without_rows(tmp_path: Path) -> None:
    path = tmp_path / "none.json"
    with BatchWriter(path, "json", SAMPLE.schema):
        pass
    assert json.loads(path.read_text()) == []


def test_formats_constant() -> None:
    assert set(CONTENT_TYPES) == set(FORMATS)


@pytest.mark.slow
def test_analyzing_a_300_mb_csv_stays_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    block = "".join(f"{i},{i * 0.5},name-{i % 5000},{i % 2 == 0}\n" for i in range(100_000))
    with path.open("w") as f:
        f.write("id,value,name,even\n")
        while f.tell() < 300 << 20:
            f.write(block)
    rows = (path.stat().st_size - len("id,value,name,even\n")) // len(block) * 100_000
    code = textwrap.dedent("""
        import resource, sys
        from pathlib import Path
        from services.data.formats import analyze
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result = analyze(Path(sys.argv[1]), "csv")
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(result.row_count, grown // 1024)
    """)
    done = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True,
                          text=True, timeout=240, check=True)
    row_count, grown_mb = map(int, done.stdout.split())
    assert row_count == rows
    assert grown_mb < 150, f"peak RSS grew by {grown_mb} MB"
