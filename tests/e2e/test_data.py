"""The data service through the gateway, in both run modes (embedded: a local folder; distributed:
a real S3 server, SeaweedFS): round trips of every format, byte ranges, immutable versions,
resumable uploads, bad input that leaves nothing behind, PII scan and masking, encryption at
rest, labelling tasks, lineage, soft delete / restore / purge with the storage quota, events."""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import INTERNAL, REPO, Platform
from workbench.events.contracts import validate_event_data
from workbench.testing import ApiUser, add_member, register, unique

WB = [sys.executable, "-m", "services.cli"]


# ---- files ------------------------------------------------------------------------------------

ROWS = [{"id": i, "name": f"item {i}", "price": round(i * 1.25, 2), "in_stock": i % 3 == 0}
        for i in range(1, 41)]


def csv_bytes(rows: list[dict[str, Any]] = ROWS, delimiter: str = ",") -> bytes:
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=list(rows[0]), delimiter=delimiter, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return out.getvalue().encode()


def parquet_bytes(rows: list[dict[str, Any]] = ROWS) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


FILES: dict[str, tuple[str, bytes, int]] = {  # format -> (filename, bytes, rows)
    "csv": ("items.csv", csv_bytes(), 40),
    "tsv": ("items.tsv", csv_bytes(delimiter="\t"), 40),
    "jsonl": ("items.jsonl", b"".join(orjson.dumps(r) + b"\n" for r in ROWS), 40),
    "json": ("items.json", orjson.dumps(ROWS), 40),
    "parquet": ("items.parquet", parquet_bytes(), 40),
    "txt": ("notes.txt", "".join(f"line {i}: ünïcode ✓\n" for i in range(25)).encode(), 25),
    "zip": ("bundle.zip", zip_bytes({"a.csv": csv_bytes(), "b.jsonl": b'{"x": 1}\n{"x": 2}\n'}),
            42),
}


# ---- helpers ----------------------------------------------------------------------------------

@dataclass
class Org:
    owner: ApiUser
    project: str

    @property
    def h(self) -> dict[str, str]:
        return self.owner.headers


def new_org(client: httpx.Client) -> Org:
    owner = register(client)
    r = client.post("/api/v1/projects", json={"name": unique("data-")}, headers=owner.headers)
    assert r.status_code == 201, r.text
    return Org(owner, r.json()["id"])


def new_dataset(client: httpx.Client, org: Org, **extra: Any) -> dict[str, Any]:
    r = client.post("/api/v1/datasets", headers=org.h,
                    json={"project_id": org.project, "name": unique("ds-"), **extra})
    assert r.status_code == 201, r.text
    return dict(r.json())


def upload(client: httpx.Client, org: Org, dataset_id: str, filename: str, data: bytes, *,
           multipart: bool = True, **params: str) -> httpx.Response:
    path = f"/api/v1/datasets/{dataset_id}/versions"
    if multipart:
        return client.post(path, headers=org.h, files={"file": (filename, data)},
                           data=params or None)
    return client.post(path, headers={**org.h, "content-type": "application/octet-stream"},
                       params={"filename": filename, **params}, content=data)


def download(client: httpx.Client, org: Org, dataset_id: str, number: int,
             **headers: str) -> httpx.Response:
    return client.get(f"/api/v1/datasets/{dataset_id}/versions/{number}/download",
                      headers={**org.h, **headers})


def storage_used(client: httpx.Client, org: Org) -> int:
    r = client.get(f"/api/v1/orgs/{org.owner.org_id}/quotas", headers=org.h)
    assert r.status_code == 200, r.text
    return next((q["used"] for q in r.json() if q["resource"] == "storage_bytes"), 0)


def set_storage_limit(platform: Platform, org_id: str, limit: int) -> None:
    if platform.user_url:
        r = httpx.put(f"{platform.user_url}/internal/v1/orgs/{org_id}/quotas",
                      json={"limits": {"storage_bytes": limit}},
                      headers={"x-wb-internal-token": INTERNAL})
        assert r.status_code == 204, r.text
    else:
        subprocess.run([*WB, "quota", "set", org_id, "storage_bytes", str(limit)],
                       env=platform.env, check=True, cwd=REPO, capture_output=True)


def problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    return body


@pytest.fixture(scope="module")
def org(platform: Platform) -> Iterator[Org]:
    with platform.client() as c:
        yield new_org(c)


# ---- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", list(FILES))
def test_upload_version_download_round_trip_is_byte_identical(
        client: httpx.Client, org: Org, fmt: str) -> None:
    filename, data, rows = FILES[fmt]
    d = new_dataset(client, org)
    r = upload(client, org, d["id"], filename, data, multipart=fmt in ("csv", "parquet", "zip"),
               note=f"first {fmt}")
    assert r.status_code == 201, r.text
    v = r.json()
    digest = hashlib.sha256(data).hexdigest()
    assert (v["number"], v["format"], v["sha256"], v["size_bytes"]) == (1, fmt, digest, len(data))
    assert v["row_count"] == rows and v["note"] == f"first {fmt}"
    assert v["transform"] == {"type": "upload"} and v["parents"] == []
    if fmt in ("csv", "tsv", "jsonl", "json", "parquet"):
        assert [c["name"] for c in v["schema"]] == ["id", "name", "price", "in_stock"]
        assert v["stats"]["id"]["min"] == 1 and v["stats"]["id"]["max"] == 40
    if fmt == "zip":
        assert [m["name"] for m in v["members"]] == ["a.csv", "b.jsonl"]
    got = download(client, org, d["id"], 1)
    assert got.status_code == 200
    assert got.content == data
    assert got.headers["etag"] == f'"{digest}"'
    assert got.headers["accept-ranges"] == "bytes"
    assert client.get(f"/api/v1/datasets/{d['id']}", headers=org.h).json()["format"] == fmt


def test_preview_pages_through_the_first_rows(client: httpx.Client, org: Org) -> None:
    d = new_dataset(client, org)
    assert upload(client, org, d["id"], "items.csv", csv_bytes()).status_code == 201
    r = client.get(f"/api/v1/datasets/{d['id']}/versions/1/preview",
                   params={"offset": 5, "limit": 3}, headers=org.h)
    assert r.status_code == 200, r.text
    page = r.json()
    assert [row["id"] for row in page["rows"]] == [6, 7, 8]
    assert page["row_count"] == 40


def test_byte_ranges(client: httpx.Client, org: Org) -> None:
    d = new_dataset(client, org)
    data = csv_bytes()
    assert upload(client, org, d["id"], "items.csv", data).status_code == 201
    r = download(client, org, d["id"], 1, range="bytes=10-19")
    assert r.status_code == 206 and r.content == data[10:20]
    assert r.headers["content-range"] == f"bytes 10-19/{len(data)}"
    r = download(client, org, d["id"], 1, range="bytes=-7")
    assert r.status_code == 206 and r.content == data[-7:]
    r = download(client, org, d["id"], 1, range=f"bytes=5-{len(data) + 100}")
    assert r.status_code == 206 and r.content == data[5:]
    r = download(client, org, d["id"], 1, range=f"bytes={len(data)}-")
    assert problem(r, 416)["code"] == "range_not_satisfiable"
    assert r.headers["content-range"] == f"bytes */{len(data)}"


def test_versions_are_immutable_and_numbered(client: httpx.Client, org: Org) -> None:
    d = new_dataset(client, org)
    first, second = csv_bytes(ROWS[:10]), csv_bytes(ROWS[10:])
    assert upload(client, org, d["id"], "a.csv", first).status_code == 201
    assert upload(client, org, d["id"], "b.csv", second, note="more rows").status_code == 201
    listed = client.get(f"/api/v1/datasets/{d['id']}/versions", headers=org.h).json()["items"]
    assert [(v["number"], v["row_count"]) for v in listed] == [(1, 10), (2, 30)]
    assert download(client, org, d["id"], 1).content == first
    assert download(client, org, d["id"], 2).content == second
    ds = client.get(f"/api/v1/datasets/{d['id']}", headers=org.h).json()
    assert (ds["latest_version"], ds["row_count"]) == (2, 30)
    assert ds["size_bytes"] == len(first) + len(second)
    assert problem(download(client, org, d["id"], 3), 404)


def test_resumable_upload_in_chunks(client: httpx.Client, org: Org) -> None:
    d = new_dataset(client, org)
    data = b"".join(orjson.dumps({"n": i, "text": "x" * 50}) + b"\n" for i in range(3000))
    r = client.post(f"/api/v1/datasets/{d['id']}/uploads", headers=org.h,
                    json={"filename": "big.jsonl", "size": len(data), "note": "chunked"})
    assert r.status_code == 201, r.text
    up = r.json()
    base = f"/api/v1/datasets/{d['id']}/uploads/{up['id']}"
    cut = [0, 70_000, 150_000, len(data)]
    for a, b in itertools.pairwise(cut):
        r = client.put(base, content=data[a:b], headers={**org.h, "upload-offset": str(a)})
        assert r.status_code == 200, r.text
        assert r.json()["received"] == b
        if a == 0:  # a chunk sent again after a break: told where the upload stands
            again = client.put(base, content=data[a:b], headers={**org.h, "upload-offset": "0"})
            assert problem(again, 409)["offset"] == b
            early = client.post(base + "/complete", json={}, headers=org.h)
            assert problem(early, 409)["code"] == "upload_incomplete"
    assert client.get(base, headers=org.h).json()["received"] == len(data)
    r = client.post(base + "/complete", json={}, headers=org.h)
    assert r.status_code == 201, r.text
    v = r.json()
    assert (v["sha256"], v["row_count"], v["note"]) == (
        hashlib.sha256(data).hexdigest(), 3000, "chunked")
    assert download(client, org, d["id"], v["number"]).content == data
    assert client.get(base, headers=org.h).json()["status"] == "completed"


def test_resumable_upload_refuses_bytes_past_its_size_and_can_be_cancelled(
        client: httpx.Client, org: Org, platform: Platform) -> None:
    d = new_dataset(client, org)
    before = storage_used(client, org)
    up = client.post(f"/api/v1/datasets/{d['id']}/uploads", headers=org.h,
                     json={"filename": "x.csv", "size": 100}).json()
    assert storage_used(client, org) == before + 100  # reserved up front
    base = f"/api/v1/datasets/{d['id']}/uploads/{up['id']}"
    r = client.put(base, content=b"a" * 101, headers={**org.h, "upload-offset": "0"})
    assert problem(r, 413)["code"] == "chunk_past_end"
    assert client.put(base, content=b"id\n1\n", headers={**org.h, "upload-offset": "0"}
                      ).status_code == 200
    assert client.delete(base, headers=org.h).status_code == 204
    assert client.get(base, headers=org.h).json()["status"] == "aborted"
    assert storage_used(client, org) == before
    assert platform.object_keys(f"uploads/{org.owner.org_id}/{up['id']}") == []


# ---- bad input --------------------------------------------------------------------------------

def _truncated_parquet() -> bytes:
    data = parquet_bytes()
    return data[: len(data) // 2]


BAD: dict[str, tuple[str, bytes, int, str]] = {  # case -> (filename, bytes, status, in detail)
    "truncated parquet": ("t.parquet", _truncated_parquet(), 422, "parquet"),
    "ragged csv": ("r.csv", b"a,b,c\n1,2,3\n4,5\n6,7,8\n", 422, "row"),
    "invalid utf-8": ("u.csv", b"a,b\n1,ok\n2,\xff\xfe bad\n", 422, "UTF-8"),
    "empty file": ("e.csv", b"", 422, "empty"),
    "zip with ../ entry": ("z.zip", zip_bytes({"../evil.csv": b"a\n1\n"}), 422, ".."),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_file_is_a_clear_4xx_and_leaves_nothing_behind(
        client: httpx.Client, platform: Platform, case: str) -> None:
    org = new_org(client)
    filename, data, status, needle = BAD[case]
    d = new_dataset(client, org)
    before = storage_used(client, org)
    r = upload(client, org, d["id"], filename, data)
    body = problem(r, status)
    assert needle.lower() in body["detail"].lower(), body
    assert filename in body["detail"]
    _assert_nothing_left(client, platform, org, d["id"], before)


def test_bad_rows_are_located(client: httpx.Client, org: Org) -> None:
    d = new_dataset(client, org)
    body = problem(upload(client, org, d["id"], "r.csv", b"a,b,c\n1,2,3\n4,5\n"), 422)
    assert body["location"].get("row") == 2 or body["location"].get("line") == 3, body
    body = problem(upload(client, org, d["id"], "u.txt", b"fine\nalso fine\nbad \xff\n"), 422)
    assert body["location"].get("line") == 3, body


def test_over_quota_file_is_refused_and_leaves_nothing_behind(
        client: httpx.Client, platform: Platform) -> None:
    org = new_org(client)
    d = new_dataset(client, org)
    assert upload(client, org, d["id"], "small.csv", csv_bytes(ROWS[:3])).status_code == 201
    used = storage_used(client, org)
    set_storage_limit(platform, org.owner.org_id, used + 1000)
    big = csv_bytes(ROWS * 20)
    for multipart in (True, False):
        body = problem(upload(client, org, d["id"], "big.csv", big, multipart=multipart), 413)
        assert body["code"] == "storage_quota_exceeded" and "quota" in body["detail"]
    r = client.post(f"/api/v1/datasets/{d['id']}/uploads", headers=org.h,
                    json={"filename": "big.csv", "size": len(big)})
    assert problem(r, 413)["code"] == "storage_quota_exceeded"
    assert storage_used(client, org) == used
    ds = client.get(f"/api/v1/datasets/{d['id']}", headers=org.h).json()
    assert ds["latest_version"] == 1
    assert len(platform.object_keys(f"datasets/{org.owner.org_id}/{d['id']}/")) == 1
    # what fits still goes in
    assert upload(client, org, d["id"], "fits.csv", csv_bytes(ROWS[:5])).status_code == 201


def _assert_nothing_left(client: httpx.Client, platform: Platform, org: Org, dataset_id: str,
                         storage_before: int) -> None:
    ds = client.get(f"/api/v1/datasets/{dataset_id}", headers=org.h).json()
    assert (ds["latest_version"], ds["status"], ds["size_bytes"]) == (0, "empty", 0)
    listed = client.get(f"/api/v1/datasets/{dataset_id}/versions", headers=org.h).json()
    assert listed["items"] == []
    assert platform.object_keys(f"datasets/{org.owner.org_id}/{dataset_id}/") == []
    assert storage_used(client, org) == storage_before
    tmp = platform.workdir / "data" / "tmp" / "data-uploads"
    assert not tmp.exists() or list(tmp.iterdir()) == []


def test_request_errors(client: httpx.Client, org: Org) -> None:
    d = new_dataset(client, org)
    base = f"/api/v1/datasets/{d['id']}"
    assert problem(client.post("/api/v1/datasets", headers=org.h, json={
        "project_id": org.project, "name": "x", "owner_id": org.owner.user_id}), 422)
    assert problem(client.post("/api/v1/datasets", headers=org.h, json={
        "project_id": "00000000-0000-7000-8000-000000000000", "name": "x"}), 404)
    assert problem(client.post("/api/v1/datasets", headers=org.h, json={
        "project_id": org.project, "name": d["name"]}), 409)["code"] == "name_taken"
    assert problem(client.post(base + "/versions", headers=org.h,
                               files={"other": ("a.csv", b"a\n1\n")}), 400)["code"] == \
        "missing_file"
    r = client.post(base + "/versions", headers=org.h, files={"file": ("a.csv", b"a\n1\n")},
                    data={"format": "xlsx"})
    assert problem(r, 400)["code"] == "unknown_format"
    r = upload(client, org, d["id"], "a.parquet", csv_bytes(), format="parquet")
    assert problem(r, 422)["code"] == "format_mismatch"
    assert problem(client.get(base + "/versions/0", headers=org.h), 422)
    assert problem(client.get(base + "/versions/1/preview", headers=org.h), 404)
    assert problem(client.patch(base, json={"name": None}, headers=org.h), 422)


# ---- PII, masking, encryption -----------------------------------------------------------------

EMAILS = ["ada.lovelace@example.com", "li.wei@corp.example.cn"]
PHONES = ["13812345678", "+86 139 1234 5678"]
CN_IDS = ["11010519491231002X", "440308199901011234"]
CARDS = ["4111111111111111", "5500 0000 0000 0004"]


def _cn_id_ok(v: str) -> bool:
    weights = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]
    return "10X98765432"[sum(int(c) * w for c, w in zip(v[:17], weights, strict=True)) % 11] \
        == v[17].upper()


def pii_rows() -> list[dict[str, Any]]:
    ids = [i for i in CN_IDS if _cn_id_ok(i)]
    assert ids, "no valid id in the fixture"
    rows = []
    for i in range(60):
        rows.append({
            "customer_name": f"Customer {i}",
            "contact": EMAILS[i % 2] if i % 3 == 0 else "",
            "notes": f"call {PHONES[i % 2]} today" if i % 4 == 0 else "no contact",
            "id_number": ids[i % len(ids)] if i % 5 == 0 else "",
            "card": CARDS[i % 2] if i % 6 == 0 else "",
            "order_no": f"ORD-2024{i:06d}",  # control: never PII
        })
    return rows


def test_pii_scan_finds_planted_values_and_masking_removes_them(
        client: httpx.Client, org: Org) -> None:
    rows = pii_rows()
    d = new_dataset(client, org)
    assert upload(client, org, d["id"], "customers.csv", csv_bytes(rows)).status_code == 201
    r = client.post(f"/api/v1/datasets/{d['id']}/versions/1/pii-scan", headers=org.h)
    assert r.status_code == 200, r.text
    report = r.json()
    by_column = {c["column"]: c for c in report["columns"]}
    assert by_column["contact"]["kinds"] == {"email": sum(1 for x in rows if x["contact"])}
    assert by_column["notes"]["kinds"] == {"phone": sum(1 for x in rows if "call" in x["notes"])}
    assert by_column["id_number"]["kinds"] == {
        "cn_resident_id": sum(1 for x in rows if x["id_number"])}
    assert by_column["card"]["kinds"] == {"bank_card": sum(1 for x in rows if x["card"])}
    assert by_column["customer_name"]["name_column"] is True
    assert "order_no" not in by_column
    assert client.get(f"/api/v1/datasets/{d['id']}/versions/1/pii-scan",
                      headers=org.h).json() == report

    r = client.post(f"/api/v1/datasets/{d['id']}/versions/1/mask", headers=org.h,
                    json={"strategy": "partial", "note": "shareable"})
    assert r.status_code == 201, r.text
    masked = r.json()
    assert masked["number"] == 2 and masked["transform"]["type"] == "mask"
    assert masked["parents"] == [download_version_id(client, org, d["id"], 1)]
    text = download(client, org, d["id"], 2).text
    planted = EMAILS + PHONES + CN_IDS + CARDS + [f"Customer {i}" for i in range(60)]
    for value in planted:
        assert value not in text, value
    assert "ORD-2024000007" in text  # untouched columns stay
    lineage = client.get(f"/api/v1/datasets/{d['id']}/lineage", headers=org.h).json()
    assert [(e["parent"], e["child"]) for e in lineage["edges"]] == [
        (masked["parents"][0], masked["id"])]
    hashed = client.post(f"/api/v1/datasets/{d['id']}/versions/1/mask", headers=org.h,
                         json={"strategy": "hash", "columns": [{"column": "contact"}]})
    assert hashed.status_code == 201, hashed.text
    hashed_text = download(client, org, d["id"], 3).text
    assert EMAILS[0] not in hashed_text and "hash:" in hashed_text
    bad = client.post(f"/api/v1/datasets/{d['id']}/versions/1/mask", headers=org.h,
                      json={"columns": [{"column": "nope"}]})
    assert problem(bad, 422)["code"] == "unknown_column"


def download_version_id(client: httpx.Client, org: Org, dataset_id: str, number: int) -> str:
    r = client.get(f"/api/v1/datasets/{dataset_id}/versions/{number}", headers=org.h)
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def test_sensitive_dataset_is_encrypted_at_rest(client: httpx.Client, org: Org,
                                                platform: Platform) -> None:
    marker = unique("TOP-SECRET-")
    data = csv_bytes([{"id": i, "secret": f"{marker}-{i}"} for i in range(3000)])
    d = new_dataset(client, org, sensitive=True)
    r = upload(client, org, d["id"], "secrets.csv", data)
    assert r.status_code == 201, r.text
    assert r.json()["encrypted"] is True
    [key] = platform.object_keys(f"datasets/{org.owner.org_id}/{d['id']}/")
    stored = platform.object_bytes(key)
    assert marker.encode() not in stored and len(stored) > len(data)
    assert download(client, org, d["id"], 1).content == data
    mid = len(data) // 2
    r = download(client, org, d["id"], 1, range=f"bytes={mid}-{mid + 99}")
    assert r.status_code == 206 and r.content == data[mid:mid + 100]
    # A plain dataset flagged sensitive later gets its versions encrypted.
    plain = new_dataset(client, org)
    assert upload(client, org, plain["id"], "p.csv", data).status_code == 201
    assert client.patch(f"/api/v1/datasets/{plain['id']}", json={"sensitive": True},
                        headers=org.h).status_code == 200
    deadline = time.monotonic() + 20
    while not client.get(f"/api/v1/datasets/{plain['id']}/versions/1",
                         headers=org.h).json()["encrypted"]:
        assert time.monotonic() < deadline, "existing version never encrypted"
        time.sleep(0.2)
    [key] = platform.object_keys(f"datasets/{org.owner.org_id}/{plain['id']}/")
    assert marker.encode() not in platform.object_bytes(key)
    assert download(client, org, plain["id"], 1).content == data
    r = client.patch(f"/api/v1/datasets/{plain['id']}", json={"sensitive": False},
                     headers=org.h)
    assert problem(r, 409)["code"] == "sensitive_is_permanent"


# ---- annotations ------------------------------------------------------------------------------

def test_label_task_and_export_of_the_labelled_version(client: httpx.Client, org: Org) -> None:
    d = new_dataset(client, org)
    assert upload(client, org, d["id"], "t.jsonl", FILES["jsonl"][1]).status_code == 201
    base = f"/api/v1/datasets/{d['id']}/annotation-tasks"
    r = client.post(base, headers=org.h, json={
        "name": "stock", "labels": ["keep", "drop"], "assignee_id": org.owner.user_id})
    assert r.status_code == 201, r.text
    task = r.json()
    assert (task["total_rows"], task["status"], task["labelled_rows"]) == (40, "pending", 0)
    t = f"{base}/{task['id']}"
    bad = client.put(t + "/labels", headers=org.h, json={"items": [{"row": 0, "label": "x"}]})
    assert problem(bad, 422)
    bad = client.put(t + "/labels", headers=org.h, json={"items": [{"row": 40, "label": "keep"}]})
    assert problem(bad, 422)
    items = [{"row": i, "label": "keep" if i % 2 else "drop"} for i in range(10)]
    r = client.put(t + "/labels", headers=org.h, json={"items": items})
    assert r.status_code == 200, r.text
    assert (r.json()["labelled_rows"], r.json()["status"]) == (10, "in_progress")
    page = client.get(t + "/labels", params={"limit": 4}, headers=org.h).json()
    assert [x["row"] for x in page["items"]] == [0, 1, 2, 3] and page["next_cursor"] == "3"
    r = client.post(t + "/export", headers=org.h, json={"only_labelled": True})
    assert r.status_code == 201, r.text
    v = r.json()
    assert v["row_count"] == 10 and v["transform"]["type"] == "annotate"
    lines = [orjson.loads(x) for x in download(client, org, d["id"], v["number"]).content
             .splitlines()]
    assert [(x["id"], x["label"]) for x in lines] == [
        (ROWS[i]["id"], "keep" if i % 2 else "drop") for i in range(10)]
    done = client.patch(t, headers=org.h, json={"status": "completed"})
    assert done.status_code == 200 and done.json()["completed_at"]
    assert problem(client.put(t + "/labels", headers=org.h, json={"items": items[:1]}), 409)
    listed = client.get(base, params={"status": "completed"}, headers=org.h).json()["items"]
    assert [x["id"] for x in listed] == [task["id"]]


# ---- lifecycle --------------------------------------------------------------------------------

def test_soft_delete_restore_and_purge_release_storage(client: httpx.Client, org: Org,
                                                      platform: Platform) -> None:
    d = new_dataset(client, org)
    before = storage_used(client, org)
    data = csv_bytes()
    assert upload(client, org, d["id"], "a.csv", data).status_code == 201
    assert storage_used(client, org) == before + len(data)
    base = f"/api/v1/datasets/{d['id']}"
    assert problem(client.post(base + "/purge", headers=org.h), 409)["code"] == "not_deleted"
    assert client.delete(base, headers=org.h).status_code == 204
    assert problem(client.get(base, headers=org.h), 404)
    deleted = client.get("/api/v1/datasets", params={"deleted": True}, headers=org.h).json()
    assert d["id"] in [x["id"] for x in deleted["items"]]
    assert client.post(base + "/restore", headers=org.h).status_code == 200
    assert download(client, org, d["id"], 1).content == data
    assert client.delete(base, headers=org.h).status_code == 204
    assert client.post(base + "/purge", headers=org.h).status_code == 204
    assert problem(client.post(base + "/restore", headers=org.h), 404)
    assert storage_used(client, org) == before
    assert platform.object_keys(f"datasets/{org.owner.org_id}/{d['id']}/") == []


def test_list_filters_and_pages(client: httpx.Client) -> None:
    org = new_org(client)
    made = [new_dataset(client, org, tags=["t1"] if i % 2 else ["t2"],
                        description=f"about {'apples' if i < 2 else 'pears'}")
            for i in range(5)]
    seen, cursor = [], None
    while True:
        r = client.get("/api/v1/datasets", params={"limit": 2, **(
            {"cursor": cursor} if cursor else {})}, headers=org.h)
        assert r.status_code == 200, r.text
        seen += [x["id"] for x in r.json()["items"]]
        cursor = r.json()["next_cursor"]
        if not cursor:
            break
    assert seen == [d["id"] for d in made]
    tagged = client.get("/api/v1/datasets", params={"tag": "t1"}, headers=org.h).json()
    assert [x["id"] for x in tagged["items"]] == [made[1]["id"], made[3]["id"]]
    q = client.get("/api/v1/datasets", params={"q": "APPLES"}, headers=org.h).json()
    assert [x["id"] for x in q["items"]] == [made[0]["id"], made[1]["id"]]
    by_project = client.get("/api/v1/datasets", params={"project_id": org.project},
                            headers=org.h).json()
    assert len(by_project["items"]) == 5


# ---- tenancy and RBAC -------------------------------------------------------------------------

def test_another_orgs_datasets_are_404_on_every_route(client: httpx.Client,
                                                      platform: Platform) -> None:
    victim, attacker = new_org(client), new_org(client)
    d = new_dataset(client, victim, sensitive=True)
    assert upload(client, victim, d["id"], "v.jsonl", FILES["jsonl"][1]).status_code == 201
    up = client.post(f"/api/v1/datasets/{d['id']}/uploads", headers=victim.h,
                     json={"filename": "u.csv", "size": 10}).json()
    task = client.post(f"/api/v1/datasets/{d['id']}/annotation-tasks", headers=victim.h,
                       json={"name": "t", "labels": ["a", "b"]}).json()
    ids = {"dataset_id": d["id"], "number": "1", "upload_id": up["id"], "task_id": task["id"]}
    for method, template in data_routes_with_ids():
        path = template
        for k, v in ids.items():
            path = path.replace("{" + k + "}", v)
        if method == "PUT" and template.endswith("/uploads/{upload_id}"):
            r = client.put(path, content=b"1234", headers={**attacker.h, "upload-offset": "0"})
        elif method == "POST" and template.endswith("/versions"):
            r = client.post(path, headers=attacker.h, files={"file": ("x.csv", b"a\n1\n")})
        else:
            r = client.request(method, path, headers=attacker.h,
                               json=valid_body(method, template))
        assert r.status_code == 404, (method, template, r.status_code, r.text)
        assert d["name"] not in r.text
    # still the victim's, unchanged
    assert client.get(f"/api/v1/datasets/{d['id']}", headers=victim.h).json()["name"] == d["name"]
    listed = client.get("/api/v1/datasets", headers=attacker.h).json()["items"]
    assert d["id"] not in [x["id"] for x in listed]
    # a dataset cannot be created in another org's project
    r = client.post("/api/v1/datasets", headers=attacker.h,
                    json={"project_id": victim.project, "name": "sneaky"})
    assert problem(r, 404)


def valid_body(method: str, template: str) -> dict[str, Any] | None:
    """A body that passes validation, so that only the tenancy check can refuse the call."""
    if method in ("GET", "DELETE"):
        return None
    by_suffix: dict[str, dict[str, Any]] = {
        "/annotation-tasks": {"name": "t", "labels": ["a", "b"]},
        "/labels": {"items": [{"row": 0, "label": "a"}]},
        "/uploads": {"filename": "x.csv", "size": 10},
        "/mask": {"strategy": "redact"},
    }
    for suffix, body in by_suffix.items():
        if template.endswith(suffix):
            return body
    return {"name": "pwned"} if method == "PATCH" else {}


def data_routes_with_ids() -> list[tuple[str, str]]:
    from services.cli import SERVICES
    from tests.e2e.test_tenancy import PARAM, walk_routes

    spec = SERVICES["data"]
    app = spec.load().create_app(spec.make_settings())
    routes = sorted({(m, p) for m, p in walk_routes(app.routes)
                     if PARAM.search(p) and p.startswith("/api/")})
    assert len(routes) >= 25, routes
    return routes


def test_viewer_reads_member_writes_and_deleting_needs_permission(
        client: httpx.Client, org: Org) -> None:
    d = new_dataset(client, org)
    assert upload(client, org, d["id"], "a.csv", csv_bytes()).status_code == 201
    viewer = add_member(client, org.owner, "viewer")
    member = add_member(client, org.owner, "member")
    vh, mh = viewer.headers, member.headers
    assert client.get(f"/api/v1/datasets/{d['id']}", headers=vh).status_code == 200
    assert client.get(f"/api/v1/datasets/{d['id']}/versions/1/download",
                      headers=vh).status_code == 200
    assert problem(client.post("/api/v1/datasets", headers=vh, json={
        "project_id": org.project, "name": "v"}), 403)
    assert problem(client.post(f"/api/v1/datasets/{d['id']}/versions", headers=vh,
                               files={"file": ("a.csv", b"a\n1\n")}), 403)
    assert problem(client.delete(f"/api/v1/datasets/{d['id']}", headers=vh), 403)
    assert problem(client.post(f"/api/v1/datasets/{d['id']}/versions/1/pii-scan",
                               headers=vh), 403)
    assert client.post(f"/api/v1/datasets/{d['id']}/versions", headers=mh,
                       files={"file": ("b.csv", b"a\n1\n")}).status_code == 201
    r = client.post("/api/v1/api-keys", headers=org.h,
                    json={"name": "read-only", "scopes": ["data:read"]})
    key = {"x-api-key": r.json()["key"]}
    assert client.get(f"/api/v1/datasets/{d['id']}", headers=key).status_code == 200
    assert problem(client.patch(f"/api/v1/datasets/{d['id']}", headers=key,
                                json={"description": "no"}), 403)


# ---- events -----------------------------------------------------------------------------------

def test_every_data_change_emits_a_valid_event(client: httpx.Client, platform: Platform) -> None:
    org = new_org(client)
    d = new_dataset(client, org)
    base = f"/api/v1/datasets/{d['id']}"
    assert client.patch(base, headers=org.h, json={"description": "x"}).status_code == 200
    assert upload(client, org, d["id"], "p.csv", csv_bytes(pii_rows())).status_code == 201
    assert download(client, org, d["id"], 1).status_code == 200
    assert client.post(base + "/versions/1/pii-scan", headers=org.h).status_code == 200
    assert client.post(base + "/versions/1/mask", headers=org.h, json={}).status_code == 201
    up = client.post(base + "/uploads", headers=org.h, json={"filename": "a", "size": 5}).json()
    assert client.delete(f"{base}/uploads/{up['id']}", headers=org.h).status_code == 204
    task = client.post(base + "/annotation-tasks", headers=org.h,
                       json={"name": "t", "labels": ["a", "b"]}).json()
    t = f"{base}/annotation-tasks/{task['id']}"
    assert client.put(t + "/labels", headers=org.h,
                      json={"items": [{"row": 0, "label": "a"}]}).status_code == 200
    assert client.patch(t, headers=org.h, json={"status": "completed"}).status_code == 200
    assert client.delete(base, headers=org.h).status_code == 204
    assert client.post(base + "/restore", headers=org.h).status_code == 200
    assert client.delete(base, headers=org.h).status_code == 204
    assert client.post(base + "/purge", headers=org.h).status_code == 204
    expected = {"wb.data.dataset.created", "wb.data.dataset.updated", "wb.data.dataset.deleted",
                "wb.data.dataset.restored", "wb.data.dataset.purged", "wb.data.version.created",
                "wb.data.version.downloaded", "wb.data.upload.started",
                "wb.data.upload.aborted", "wb.data.pii_scan.completed",
                "wb.data.annotation_task.created", "wb.data.annotation_task.updated",
                "wb.data.annotations.labelled"}
    deadline = time.monotonic() + 15
    while True:
        rows = platform.db_rows("SELECT type, payload, published_at FROM wb_outbox",
                                service="data")
        mine = [(t, orjson.loads(bytes(p)), pub) for t, p, pub in rows
                if orjson.loads(bytes(p))["org_id"] == org.owner.org_id]
        if all(pub is not None for *_, pub in mine) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert all(pub is not None for *_, pub in mine), "events left in the outbox"
    for event_type, envelope, _ in mine:
        validate_event_data(event_type, envelope["data"])
        assert envelope["actor"] == f"user:{org.owner.user_id}"
    assert expected <= {t for t, *_ in mine}, sorted(expected - {t for t, *_ in mine})
