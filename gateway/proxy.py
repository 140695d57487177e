"""Upstreams: how the gateway hands a request to a service — straight into its ASGI app in
embedded mode, over a pooled aiohttp connection in distributed mode (measured: see
docs/performance.md). Bodies stream both ways; nothing is buffered but small request bodies."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import aiohttp
from multidict import CIMultiDict
from starlette.types import ASGIApp, Receive, Scope, Send

from workbench.errors import ServiceUnavailable

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailers", b"transfer-encoding", b"upgrade", b"host",
})
SMALL_BODY = 1 << 20


class Upstream(Protocol):
    name: str

    async def forward(self, scope: Scope, receive: Receive, send: Send,
                      headers: list[tuple[bytes, bytes]]) -> None: ...

    async def close(self) -> None: ...


class AsgiUpstream:
    """Embedded mode: the service app runs in this process."""

    def __init__(self, name: str, app: ASGIApp) -> None:
        self.name, self.app = name, app

    async def forward(self, scope: Scope, receive: Receive, send: Send,
                      headers: list[tuple[bytes, bytes]]) -> None:
        await self.app({**scope, "headers": headers}, receive, send)

    async def close(self) -> None:
        return None


class HttpUpstream:
    def __init__(self, name: str, base_url: str, *, connect_timeout_s: float,
                 read_timeout_s: float, limit: int = 1000) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s,
                                              sock_read=read_timeout_s)
        self._limit = limit
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._limit, limit_per_host=self._limit,
                                               keepalive_timeout=60, ttl_dns_cache=300),
                timeout=self._timeout,
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
                # One session serves every client: it must never keep cookies of its own (a
                # Set-Cookie meant for one client would go out with the next one's requests).
                # Clients' own Cookie headers pass through as sent.
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def forward(self, scope: Scope, receive: Receive, send: Send,
                      headers: list[tuple[bytes, bytes]]) -> None:
        # Built as the multidict aiohttp keeps headers in, so it takes them as they are.
        out_headers: CIMultiDict[str] = CIMultiDict()
        length: int | None = None
        for k, v in headers:
            if k in HOP_BY_HOP:
                continue
            if k == b"content-length":
                length = int(v) if v.isdigit() else None
            out_headers.add(k.decode("latin-1"), v.decode("latin-1"))
        data: bytes | AsyncIterator[bytes] | None
        if length is not None and length <= SMALL_BODY:
            data = await _read_all(receive) if length else None
        elif scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS") and length is None:
            data = None
        else:
            data = _stream(receive)
            if length is None:
                out_headers.popall("content-length", None)
        qs = scope.get("query_string", b"")
        url = self.base_url + scope.get("raw_path", scope["path"].encode()).decode("latin-1")
        if qs:
            url += "?" + qs.decode("latin-1")
        try:
            async with self._client().request(
                scope["method"], url, headers=out_headers, data=data, allow_redirects=False,
            ) as resp:
                resp_headers = [
                    (k.lower(), v) for k, v in resp.raw_headers
                    if k.lower() not in HOP_BY_HOP
                ]
                await send({"type": "http.response.start", "status": resp.status,
                            "headers": resp_headers})
                async for chunk in resp.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk,
                                "more_body": True})
                await send({"type": "http.response.body", "body": b""})
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise ServiceUnavailable(
                f"the {self.name} service is unavailable ({type(exc).__name__}); "
                "try again shortly", code="upstream_unavailable",
            ) from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _read_all(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _stream(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body = message.get("body", b"")
        if body:
            yield body
        if not message.get("more_body", False):
            return
