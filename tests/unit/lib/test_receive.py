"""Receiving bodies into temporary files: raw and multipart, in pieces of any size, hashed and
size-limited; malformed forms are refused and leave no file behind."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from workbench.errors import BadRequest, PayloadTooLarge
from workbench.receive import receive_multipart, receive_raw

BOUNDARY = "----wbtestboundary"
CT = f"multipart/form-data; boundary={BOUNDARY}"


def form(*parts: tuple[str, str | None, bytes], close: bool = True) -> bytes:
    out = b""
    for name, filename, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += (f"--{BOUNDARY}\r\nContent-Disposition: {disp}\r\n\r\n").encode() + data + b"\r\n"
    return out + (f"--{BOUNDARY}--\r\n".encode() if close else b"")


async def pieces(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


@pytest.mark.parametrize("piece", [1, 7, 4096, 1 << 20])
async def test_multipart_file_and_fields_in_pieces_of_any_size(tmp_path: Path,
                                                               piece: int) -> None:
    payload = os.urandom(300_000) + b"\r\n--" + BOUNDARY.encode()[:-1]  # boundary-like bytes
    body = form(("note", None, "first ✓".encode()), ("file", "data.bin", payload),
                ("format", None, b"csv"))
    got = await receive_multipart(pieces(body, piece), CT, tmp_path, limit=1 << 30,
                                  too_large="too large")
    assert got.path.read_bytes() == payload
    assert (got.size, got.sha256) == (len(payload), hashlib.sha256(payload).hexdigest())
    assert got.filename == "data.bin"
    assert got.fields == {"note": "first ✓", "format": "csv"}


async def test_raw_body_is_hashed_and_limited(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    got = await receive_raw(pieces(data, 65536), tmp_path, limit=len(data), too_large="x")
    assert got.path.read_bytes() == data and got.sha256 == hashlib.sha256(data).hexdigest()
    with pytest.raises(PayloadTooLarge):
        await receive_raw(pieces(data, 65536), tmp_path / "b", limit=len(data) - 1,
                          too_large="the file is too large")
    assert list((tmp_path / "b").iterdir()) == []


@pytest.mark.parametrize("body, code", [
    (form(("file", "a.csv", b"a\n1\n"), close=False), "invalid_multipart"),  # cut short
    (form(("note", None, b"x")), "missing_file"),
    (form(("file", "a.csv", b"1"), ("file", "b.csv", b"2")), "invalid_multipart"),
    (form(("note", None, b"x" * (65 << 10)), ("file", "a.csv", b"1")), "invalid_multipart"),
    (form(("note", None, b"\xff\xfe"), ("file", "a.csv", b"1")), "invalid_multipart"),
])
async def test_malformed_forms_are_refused_and_leave_nothing(tmp_path: Path, body: bytes,
                                                             code: str) -> None:
    with pytest.raises(BadRequest) as err:
        await receive_multipart(pieces(body, 1000), CT, tmp_path, limit=1 << 20,
                                too_large="x")
    assert err.value.code == code
    assert list(tmp_path.iterdir()) == []


async def test_multipart_file_over_the_limit(tmp_path: Path) -> None:
    body = form(("file", "a.bin", b"x" * 5000))
    with pytest.raises(PayloadTooLarge, match="too large"):
        await receive_multipart(pieces(body, 512), CT, tmp_path, limit=4999,
                                too_large="too large")
    assert list(tmp_path.iterdir()) == []


async def test_content_type_without_boundary(tmp_path: Path) -> None:
    with pytest.raises(BadRequest) as err:
        await receive_multipart(pieces(b"", 1), "multipart/form-data", tmp_path, limit=10,
                                too_large="x")
    assert err.value.code == "invalid_multipart"
