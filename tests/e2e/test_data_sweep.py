"""The data service's background sweep, on an embedded platform of its own with a fast sweep:
unfinished resumable uploads expire (parts removed, reservation released, event), deleted
datasets are purged once `purge_after` passes, and a sensitive dataset whose re-encryption was
interrupted gets its plaintext versions encrypted."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.conftest import WB, Platform, base_env
from workbench.testing import ServerProcess, free_port, register, unique, wait_http


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    workdir = tmp_path_factory.mktemp("sweep")
    port = free_port()
    env = base_env(WB_MODE="embedded", WB_DATA_DIR=str(workdir / "data"),
                   WB_DATA_SWEEP_INTERVAL_S="0.3", WB_DATA_UPLOAD_TTL_S="1",
                   WB_DATA_PURGE_AFTER_DAYS="0")
    proc = ServerProcess([*WB, "up", "--port", str(port)], env=env,
                         log=workdir / "embedded.log").start()
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/readyz", proc=proc.proc, log=proc.log, timeout=60)
    yield Platform("embedded", url, env, workdir, processes=[proc])
    proc.stop()


def eventually(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def setup(client: httpx.Client) -> tuple[dict[str, str], str, str]:
    owner = register(client)
    project = client.post("/api/v1/projects", json={"name": unique("p-")},
                          headers=owner.headers).json()
    d = client.post("/api/v1/datasets", headers=owner.headers,
                    json={"project_id": project["id"], "name": unique("d-")}).json()
    return owner.headers, owner.org_id, d["id"]


def storage_used(client: httpx.Client, h: dict[str, str], org_id: str) -> int:
    quotas = client.get(f"/api/v1/orgs/{org_id}/quotas", headers=h).json()
    return next((q["used"] for q in quotas if q["resource"] == "storage_bytes"), 0)


def test_unfinished_upload_expires(swept: Platform) -> None:
    with swept.client() as client:
        h, org_id, ds = setup(client)
        up = client.post(f"/api/v1/datasets/{ds}/uploads", headers=h,
                         json={"filename": "a.csv", "size": 100}).json()
        base = f"/api/v1/datasets/{ds}/uploads/{up['id']}"
        assert client.put(base, content=b"a,b\n1,2\n", headers={**h, "upload-offset": "0"}
                          ).status_code == 200
        eventually(lambda: client.get(base, headers=h).json()["status"] == "aborted",
                   "the upload never expired")
        assert storage_used(client, h, org_id) == 0
        assert swept.object_keys(f"uploads/{org_id}/{up['id']}") == []
        late = client.put(base, content=b"3,4\n", headers={**h, "upload-offset": "8"})
        assert late.status_code == 409
        rows = swept.db_rows("SELECT payload FROM wb_outbox WHERE type = "
                             "'wb.data.upload.aborted'", service="data")
        mine = [orjson.loads(bytes(p)) for (p,) in rows]
        assert any(e["data"]["upload_id"] == up["id"] and e["data"]["reason"] == "expired"
                   and e["actor"] == "system" for e in mine)


def test_deleted_dataset_is_purged_when_its_time_comes(swept: Platform) -> None:
    with swept.client() as client:
        h, org_id, ds = setup(client)
        r = client.post(f"/api/v1/datasets/{ds}/versions", headers=h,
                        files={"file": ("a.csv", b"a,b\n1,2\n")})
        assert r.status_code == 201, r.text
        assert storage_used(client, h, org_id) == 8
        assert client.delete(f"/api/v1/datasets/{ds}", headers=h).status_code == 204

        def gone() -> bool:
            listed = client.get("/api/v1/datasets", params={"deleted": True}, headers=h)
            return ds not in [x["id"] for x in listed.json()["items"]]

        eventually(gone, "the deleted dataset was never purged")
        assert storage_used(client, h, org_id) == 0
        assert swept.object_keys(f"datasets/{org_id}/{ds}/") == []


def test_interrupted_re_encryption_is_finished_by_the_sweep(swept: Platform) -> None:
    marker = unique("SECRET-")
    with swept.client() as client:
        h, org_id, ds = setup(client)
        data = f"id,secret\n1,{marker}\n".encode()
        assert client.post(f"/api/v1/datasets/{ds}/versions", headers=h,
                           files={"file": ("a.csv", data)}).status_code == 201
        # Flagged sensitive, but the service went down before re-encrypting (simulated).
        name = client.get(f"/api/v1/datasets/{ds}", headers=h).json()["name"]
        swept.db_execute(f"UPDATE datasets SET sensitive = 1 WHERE name = '{name}'",
                         service="data")
        eventually(lambda: client.get(f"/api/v1/datasets/{ds}/versions/1",
                                      headers=h).json()["encrypted"] is True,
                   "the sweep never encrypted the version")
        [key] = swept.object_keys(f"datasets/{org_id}/{ds}/")
        assert marker.encode() not in (Path(swept.workdir) / "data" / "objects" / "data" / key
                                       ).read_bytes()
        assert client.get(f"/api/v1/datasets/{ds}/versions/1/download",
                          headers=h).content == data
