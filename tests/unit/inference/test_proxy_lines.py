"""The inference service reads a replica's SSE stream line by line as chunks arrive."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.inference.openai_api import _lines


class Chunks:
    """What the proxy reads of an aiohttp response: `iter_any()` gives whatever arrived."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = chunks

    async def iter_any(self) -> AsyncIterator[bytes]:
        for c in self.chunks:
            yield c


async def lines(*chunks: bytes) -> list[bytes]:
    content: Any = Chunks(*chunks)
    return [line async for line in _lines(content)]


async def test_lines_split_across_chunks_and_crlf_endings_come_out_whole() -> None:
    got = await lines(b'data: {"a": 1}\n\nda', b'ta: {"b"', b': 2}\r', b"\n\r\ndata: [DONE]\n\n")
    assert got == [b'data: {"a": 1}', b"", b'data: {"b": 2}', b"", b"data: [DONE]", b""]


async def test_a_last_line_without_its_newline_is_not_lost() -> None:
    assert await lines(b"data: x\n", b"data: y") == [b"data: x", b"data: y"]
    assert await lines() == []


@pytest.mark.parametrize("size", [70_000, 1_000_000])
async def test_a_line_longer_than_aiohttp_s_line_limit_is_read(size: int) -> None:
    """aiohttp's own readline gives up at 64 KiB; a long chunk (logprobs, a big tool call)
    must still pass, in however many pieces it arrives."""
    line = b"data: " + b"x" * size
    pieces = [line[i:i + 4096] for i in range(0, len(line), 4096)]
    assert await lines(*pieces, b"\n\n") == [line, b""]
