"""A 1 GB upload through the gateway into the data service (distributed mode: its own process,
a real S3 server) completes with the service's memory staying under 200 MB above idle — the
body is streamed to disk, analysed in bounded blocks and copied to the store from the file.

The data service's RSS is read from /proc every 20 ms while the upload runs (client → gateway →
data service → SeaweedFS). Slow (about a minute); `make test-slow` and CI run it."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Platform
from workbench.testing import register, unique

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SIZE = 1 << 30
LIMIT = 200 << 20


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def csv_body(size: int, digest: hashlib._Hash) -> Iterator[bytes]:
    """`size` bytes of CSV (a header and ~100-byte rows), in 1 MiB pieces."""
    header = b"id,name,amount,comment\n"
    row_tail = b",customer," + b"12345.67," + b"x" * 70 + b"\n"
    piece = bytearray(header)
    sent, n = 0, 0
    while sent < size:
        while len(piece) < (1 << 20):
            n += 1
            piece += str(n).encode() + row_tail
        chunk = bytes(piece[: size - sent])
        piece = piece[len(chunk):]
        # keep rows whole at the very end: pad the last chunk's tail to a line end
        if sent + len(chunk) == size and not chunk.endswith(b"\n"):
            chunk = chunk[:-1] + b"\n"
        digest.update(chunk)
        sent += len(chunk)
        yield chunk


def test_a_1gb_upload_keeps_the_data_service_under_200mb_above_idle(
        distributed_platform: Platform) -> None:
    platform = distributed_platform
    [data] = [p for p in platform.processes if p.log.name == "data.log"]
    assert data.proc is not None
    pid = data.proc.pid
    with platform.client(timeout=600.0) as client:
        owner = register(client)
        project = client.post("/api/v1/projects", json={"name": unique("mem-")},
                              headers=owner.headers).json()
        d = client.post("/api/v1/datasets", headers=owner.headers,
                        json={"project_id": project["id"], "name": unique("big-")}).json()
        idle = rss(pid)
        peak = [idle]
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], rss(pid))
                time.sleep(0.02)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        digest = hashlib.sha256()
        started = time.monotonic()
        try:
            r = client.post(f"/api/v1/datasets/{d['id']}/versions",
                            params={"filename": "big.csv"}, content=csv_body(SIZE, digest),
                            headers={**owner.headers, "content-type": "application/octet-stream"})
        finally:
            stop.set()
            watcher.join()
        took = time.monotonic() - started
        assert r.status_code == 201, r.text
        v = r.json()
        assert (v["size_bytes"], v["sha256"], v["format"]) == (SIZE, digest.hexdigest(), "csv")
        assert v["row_count"] > 9_000_000
        grew = peak[0] - idle
        print(f"\n1 GiB upload in {took:.1f}s ({SIZE / took / 2**20:.0f} MiB/s); data service RSS "
              f"idle {idle / 2**20:.0f} MiB, peak {peak[0] / 2**20:.0f} MiB "
              f"(+{grew / 2**20:.0f} MiB)")
        assert grew < LIMIT, f"RSS grew by {grew / 2**20:.0f} MiB"
        # the stored object is the file, byte for byte (checked by hash, streamed back)
        back = hashlib.sha256()
        # a client without the response hook of platform.client(), which reads whole bodies
        with httpx.Client(base_url=platform.url, timeout=600.0) as raw, raw.stream(
                "GET", f"/api/v1/datasets/{d['id']}/versions/1/download",
                headers=owner.headers) as resp:
            assert resp.status_code == 200
            for chunk in resp.iter_bytes(1 << 20):
                back.update(chunk)
        assert back.hexdigest() == digest.hexdigest()
        # and the file's space is given back
        client.delete(f"/api/v1/datasets/{d['id']}", headers=owner.headers)
        assert client.post(f"/api/v1/datasets/{d['id']}/purge",
                           headers=owner.headers).status_code == 204
