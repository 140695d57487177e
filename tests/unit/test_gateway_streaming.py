"""The gateway's HTTP proxy hop: streamed responses (SSE) pass through as they are produced,
request bodies stream to the upstream, and an unreachable upstream is a clear 503."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from gateway.app import create_gateway
from gateway.routes import RouteTable
from gateway.settings import GatewaySettings
from workbench.testing import free_port, wait_for_port

EVENTS = 5
GAP_S = 0.4


def upstream_app() -> FastAPI:
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/.well-known/jwks.json")
    async def jwks() -> dict[str, Any]:
        return {"keys": []}

    @app.get("/api/v1/stream/events")
    async def events() -> StreamingResponse:
        async def gen() -> AsyncIterator[bytes]:
            for i in range(EVENTS):
                yield f"data: {i} {time.time()}\n\n".encode()
                await asyncio.sleep(GAP_S)

        return StreamingResponse(gen(), media_type="text/event-stream")

    @app.get("/api/v1/auth/echo-headers")
    async def echo_headers(request: Request) -> dict[str, str]:
        return dict(request.headers)

    @app.post("/api/v1/auth/echo-size")
    async def echo_size(request: Request) -> dict[str, int]:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        return {"size": size}

    return app


class Server:
    def __init__(self, app: Any, port: int) -> None:
        # As `wb serve` runs it: uvicorn's own X-Forwarded-For handling off.
        self.server = uvicorn.Server(uvicorn.Config(app, port=port, log_config=None,
                                                    lifespan="on", proxy_headers=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def proxied() -> Iterator[str]:
    up_port, gw_port = free_port(), free_port()
    settings = GatewaySettings(
        mode="embedded", upstreams={"user": f"http://127.0.0.1:{up_port}",
                                    "streamer": f"http://127.0.0.1:{up_port}"},
        rate_limit_enabled=False, access_log=False, max_body_bytes=64 * 1024 * 1024,
    )
    routes = RouteTable([("/api/v1/stream", "streamer"), ("/api/v1/auth", "user")],
                        frozenset({("GET", "/api/v1/stream/events"),
                                   ("POST", "/api/v1/auth/echo-size"),
                                   ("GET", "/api/v1/auth/echo-headers")}))
    with Server(upstream_app(), up_port):
        wait_for_port(up_port)
        with Server(create_gateway(settings, routes=routes), gw_port):
            wait_for_port(gw_port)
            yield f"http://127.0.0.1:{gw_port}"


def test_sse_events_arrive_as_they_are_produced(proxied: str) -> None:
    arrivals: list[float] = []
    start = time.monotonic()
    with httpx.stream("GET", proxied + "/api/v1/stream/events", timeout=10) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data:"):
                arrivals.append(time.monotonic() - start)
    assert len(arrivals) == EVENTS
    # Buffering would deliver everything at the end (~EVENTS * GAP_S); streaming delivers the
    # first event long before the last one is produced.
    assert arrivals[0] < GAP_S * 2
    assert arrivals[-1] - arrivals[0] > GAP_S * (EVENTS - 2)


def test_large_request_body_streams_to_the_upstream(proxied: str) -> None:
    chunk = b"x" * (1 << 20)

    def body() -> Iterator[bytes]:
        for _ in range(20):
            yield chunk

    r = httpx.post(proxied + "/api/v1/auth/echo-size", content=body(), timeout=30)
    assert r.status_code == 200, r.text
    assert r.json() == {"size": 20 * len(chunk)}


def test_unreachable_upstream_is_503_problem() -> None:
    gw_port = free_port()
    dead = free_port()
    settings = GatewaySettings(mode="embedded", upstreams={"user": f"http://127.0.0.1:{dead}"},
                               rate_limit_enabled=False, access_log=False)
    routes = RouteTable([("/api/v1/auth", "user")], frozenset({("POST", "/api/v1/auth/login")}))
    with Server(create_gateway(settings, routes=routes), gw_port):
        wait_for_port(gw_port)
        r = httpx.post(f"http://127.0.0.1:{gw_port}/api/v1/auth/login", json={}, timeout=10)
    assert r.status_code == 503
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "upstream_unavailable"
    assert "user service" in r.json()["detail"]


def test_client_sent_internal_headers_never_reach_a_service(proxied: str) -> None:
    r = httpx.get(proxied + "/api/v1/auth/echo-headers", headers={
        "x-wb-internal-token": "forged", "x-wb-principal": "admin", "x-user-id": "1",
        "x-forwarded-for": "6.6.6.6", "forwarded": "for=6.6.6.6", "x-real-ip": "6.6.6.6",
        "x-request-id": "client-req-1", "accept": "application/json",
    }, timeout=10)
    assert r.status_code == 200, r.text
    seen = r.json()
    for name in ("x-wb-internal-token", "x-wb-principal", "x-user-id", "forwarded", "x-real-ip"):
        assert name not in seen, name
    assert seen["x-forwarded-for"] == "127.0.0.1"  # the gateway's own view of the client
    assert seen["x-request-id"] == "client-req-1"
    assert seen["accept"] == "application/json"
