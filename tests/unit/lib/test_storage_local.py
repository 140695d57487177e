"""LocalObjectStore on a real temp folder: round trips, ranges, listing, deletes, key checks, and
that failed or oversized uploads leave no file behind."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from workbench.errors import BadRequest, Conflict, NotFound, PayloadTooLarge
from workbench.settings import CoreSettings, ObjectStoreSettings, RunMode
from workbench.storage import (
    LocalObjectStore,
    ObjectInfo,
    S3ObjectStore,
    object_store_from_settings,
)


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "objects")


async def read_all(
    store: LocalObjectStore,
    key: str,
    start: int = 0,
    end: int | None = None,
    chunk_size: int = 4096,
) -> bytes:
    chunks = store.get_stream(key, start=start, end=end, chunk_size=chunk_size)
    return b"".join([chunk async for chunk in chunks])


async def chunks_of(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


async def test_put_bytes_round_trips_bytes_and_sha256(store: LocalObjectStore) -> None:
    data = b"hello object store"
    info = await store.put_bytes("docs/a.txt", data, content_type="text/plain")

    expected = ObjectInfo("docs/a.txt", len(data), hashlib.sha256(data).hexdigest(), "text/plain")
    assert info == expected
    assert await store.stat("docs/a.txt") == expected
    assert await read_all(store, "docs/a.txt") == data


async def test_put_stream_hashes_many_small_chunks(store: LocalObjectStore) -> None:
    parts = [bytes([i % 256]) * 1000 for i in range(3000)]  # 3 MB in 1 KB pieces

    info = await store.put_stream("big.bin", chunks_of(*parts))

    data = b"".join(parts)
    assert (info.size, info.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert info.content_type == "application/octet-stream"
    assert await read_all(store, "big.bin", chunk_size=65536) == data


async def test_get_stream_reads_inclusive_ranges(store: LocalObjectStore) -> None:
    await store.put_bytes("r", b"0123456789")

    assert await read_all(store, "r", start=2, end=4) == b"234"
    assert await read_all(store, "r", start=7) == b"789"
    assert await read_all(store, "r", start=8, end=100) == b"89"
    assert await read_all(store, "r", start=9, end=9) == b"9"
    assert [c async for c in store.get_stream("r", chunk_size=3)] == [b"012", b"345", b"678", b"9"]


async def test_get_stream_refuses_unsatisfiable_ranges(store: LocalObjectStore) -> None:
    await store.put_bytes("r", b"0123456789")
    await store.put_bytes("empty", b"")

    for start, end in [(10, None), (3, 2), (-1, None)]:
        with pytest.raises(BadRequest) as err:
            await read_all(store, "r", start=start, end=end)
        assert err.value.code == "range_not_satisfiable"
    with pytest.raises(BadRequest):
        await read_all(store, "empty", start=0, end=0)
    assert await read_all(store, "empty") == b""


async def test_put_replaces_object_and_its_hash(store: LocalObjectStore) -> None:
    await store.put_bytes("k", b"first", content_type="text/plain")
    await store.put_bytes("k", b"second version")

    info = await store.stat("k")
    assert info.size == len(b"second version")
    assert info.sha256 == hashlib.sha256(b"second version").hexdigest()
    assert info.content_type == "application/octet-stream"
    assert await read_all(store, "k") == b"second version"


async def test_list_yields_objects_under_prefix_in_key_order(store: LocalObjectStore) -> None:
    keys = ["a/b", "a-c", "a/b2/x", "ab", "b/1", "a/a"]
    for key in keys:
        await store.put_bytes(key, key.encode())

    listed = [info async for info in store.list()]
    assert [i.key for i in listed] == sorted(keys)
    assert all(i.size == len(i.key) for i in listed)
    assert listed[0].sha256 == hashlib.sha256(listed[0].key.encode()).hexdigest()

    assert [i.key async for i in store.list("a/")] == ["a/a", "a/b", "a/b2/x"]
    assert [i.key async for i in store.list("a/b")] == ["a/b", "a/b2/x"]
    assert [i.key async for i in store.list("a")] == ["a-c", "a/a", "a/b", "a/b2/x", "ab"]
    assert [i.key async for i in store.list("zzz/")] == []


async def test_delete_removes_object_and_is_idempotent(store: LocalObjectStore) -> None:
    await store.put_bytes("d/e/f", b"x")

    await store.delete("d/e/f")
    await store.delete("d/e/f")
    await store.delete("never/was")

    assert not await store.exists("d/e/f")
    assert [i async for i in store.list()] == []
    assert files_under(store.root) == []
    # The emptied folders are gone too, so 'd' can now be an object itself.
    await store.put_bytes("d", b"now a file")
    assert await read_all(store, "d") == b"now a file"


async def test_missing_key_raises_not_found(store: LocalObjectStore) -> None:
    with pytest.raises(NotFound):
        await store.stat("nope")
    with pytest.raises(NotFound):
        await read_all(store, "nope")
    assert not await store.exists("nope")

    await store.put_bytes("dir/file", b"x")
    with pytest.raises(NotFound):
        await store.stat("dir")  # a prefix of objects is not an object
    with pytest.raises(NotFound):
        await read_all(store, "dir")


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/abs",
        "a/../b",
        "..",
        "a/./b",
        "a//b",
        "trailing/",
        "back\\slash",
        "nul\x00byte",
        "new\nline",
        "k" * 1025,
        "é" * 513,  # 1026 bytes of UTF-8
    ],
)
async def test_bad_keys_are_refused(store: LocalObjectStore, key: str) -> None:
    with pytest.raises(BadRequest):
        await store.put_bytes(key, b"x")
    with pytest.raises(BadRequest):
        await store.stat(key)
    with pytest.raises(BadRequest):
        await store.delete(key)
    assert files_under(store.root) == []


async def test_unusual_but_valid_keys_round_trip(store: LocalObjectStore) -> None:
    for key in ["a..b/c", ".hidden", "ünï cødé/файл.txt", "k" * 255, "x/" * 300 + "y"]:
        await store.put_bytes(key, key.encode())
        assert await read_all(store, key) == key.encode()


async def test_bad_list_prefix_is_refused(store: LocalObjectStore) -> None:
    for prefix in ["/a", "a/../", "a//"]:
        with pytest.raises(BadRequest):
            [i async for i in store.list(prefix)]


async def test_max_bytes_exceeded_leaves_no_file(store: LocalObjectStore) -> None:
    with pytest.raises(PayloadTooLarge):
        await store.put_stream("big", chunks_of(b"x" * 600, b"y" * 600), max_bytes=1000)

    assert not await store.exists("big")
    assert files_under(store.root) == []

    info = await store.put_stream("fits", chunks_of(b"x" * 1000), max_bytes=1000)
    assert info.size == 1000


async def test_failed_overwrite_keeps_previous_object(store: LocalObjectStore) -> None:
    await store.put_bytes("keep", b"old")

    with pytest.raises(PayloadTooLarge):
        await store.put_stream("keep", chunks_of(b"n" * 2000), max_bytes=1000)

    assert await read_all(store, "keep") == b"old"
    assert (await store.stat("keep")).sha256 == hashlib.sha256(b"old").hexdigest()


async def test_source_error_mid_stream_leaves_nothing(store: LocalObjectStore) -> None:
    async def failing() -> AsyncIterator[bytes]:
        yield b"a" * (3 << 20)
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await store.put_stream("partial", failing())

    assert not await store.exists("partial")
    assert files_under(store.root) == []


async def test_cancelled_upload_leaves_nothing(store: LocalObjectStore) -> None:
    sent = asyncio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        yield b"a" * (2 << 20)
        sent.set()
        await asyncio.Event().wait()  # a client that stops sending
        yield b""

    task = asyncio.create_task(store.put_stream("stalled", stalls()))
    await sent.wait()
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert files_under(store.root) == []


async def test_key_and_its_folder_cannot_both_exist(store: LocalObjectStore) -> None:
    await store.put_bytes("a/b", b"x")
    with pytest.raises(Conflict):
        await store.put_bytes("a", b"y")
    await store.put_bytes("c", b"x")
    with pytest.raises(Conflict):
        await store.put_bytes("c/d", b"y")
    assert [i.key async for i in store.list()] == ["a/b", "c"]
    assert [p.name for p in files_under(store.root / "tmp")] == []


async def test_stale_sidecar_is_not_trusted(store: LocalObjectStore) -> None:
    await store.put_bytes("k", b"v1", content_type="text/plain")
    # As if a crash came between the two renames of another upload: new bytes, old sidecar.
    (store.root / "data" / "k").write_bytes(b"v2 written elsewhere")

    info = await store.stat("k")
    assert (info.size, info.sha256, info.content_type) == (20, None, None)


async def test_concurrent_puts_of_many_keys(store: LocalObjectStore) -> None:
    payloads = {f"c/{i}": bytes([i]) * (i * 1000) for i in range(40)}

    await asyncio.gather(*(store.put_bytes(k, v) for k, v in payloads.items()))

    for key, data in payloads.items():
        assert await read_all(store, key) == data
    assert files_under(store.root / "tmp") == []


async def test_ping_creates_folders_and_passes(store: LocalObjectStore) -> None:
    await store.ping()
    assert (store.root / "data").is_dir()
    await store.close()


def test_settings_pick_local_store_without_endpoint(tmp_path: Path) -> None:
    core = CoreSettings(data_dir=tmp_path)
    store = object_store_from_settings(core, ObjectStoreSettings(s3_endpoint=""))
    assert isinstance(store, LocalObjectStore)
    assert store.root == tmp_path / "objects"


def test_settings_pick_s3_store_with_endpoint(tmp_path: Path) -> None:
    settings = ObjectStoreSettings(
        s3_endpoint="https://s3.example.test:9000",
        s3_access_key="access",
        s3_secret_key="secret",
        s3_bucket="wb-objects",
    )
    store = object_store_from_settings(CoreSettings(data_dir=tmp_path), settings)
    assert isinstance(store, S3ObjectStore)
    assert (store.endpoint, store.bucket) == ("s3.example.test:9000", "wb-objects")


def test_settings_refuse_local_store_in_distributed_mode(tmp_path: Path) -> None:
    core = CoreSettings(
        mode=RunMode.DISTRIBUTED,
        data_dir=tmp_path,
        secret_key="s" * 32,
        internal_token="t" * 32,
    )
    with pytest.raises(ValueError, match="WB_S3_ENDPOINT"):
        object_store_from_settings(core, ObjectStoreSettings(s3_endpoint=""))
    assert not (tmp_path / "objects").exists()
