"""The embedded mode's in-process transport: a streamed response reaches the caller chunk by
chunk while the app still runs; request bodies, errors before and during the response, a caller
that leaves early and work after the response behave as over a real connection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask
from starlette.responses import Response

from workbench.asgi_transport import StreamingASGITransport


class State:
    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.stopped = asyncio.Event()
        self.after = asyncio.Event()


def make_app(state: State) -> FastAPI:
    app = FastAPI()

    @app.get("/gated")
    async def gated() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"one"
            await state.go.wait()
            yield b"two"
        return StreamingResponse(body(), media_type="text/plain", headers={"x-kind": "gated"})

    @app.post("/echo")
    async def echo(request: Request) -> Response:
        data = await request.body()
        return Response(data[::-1] + request.url.query.encode(), status_code=201)

    @app.get("/endless")
    async def endless() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            try:
                while True:
                    yield b"tick\n"
                    await asyncio.sleep(0.01)
            finally:
                state.stopped.set()
        return StreamingResponse(body())

    @app.get("/fails-midway")
    async def fails_midway() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"partial"
            raise RuntimeError("the model crashed")
        return StreamingResponse(body())

    @app.get("/then-more")
    async def then_more() -> Response:
        async def later() -> None:
            await asyncio.sleep(0.05)
            state.after.set()
        return Response(b"done", background=BackgroundTask(later))

    return app


async def raw_app_that_raises(scope: object, receive: object, send: object) -> None:
    raise ValueError("broken before answering")


@pytest.fixture
def state() -> State:
    return State()


@pytest.fixture
async def client(state: State) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=StreamingASGITransport(make_app(state)),
                                 base_url="http://inference") as c:
        yield c


async def test_chunks_arrive_while_the_app_still_runs(client: httpx.AsyncClient,
                                                      state: State) -> None:
    # The app only writes its second chunk once the caller has seen the first: with a
    # buffering transport this would never finish.
    async with client.stream("GET", "/gated") as r:
        assert r.status_code == 200 and r.headers["x-kind"] == "gated"
        chunks = r.aiter_raw()
        assert await asyncio.wait_for(chunks.__anext__(), 5) == b"one"
        state.go.set()
        assert await asyncio.wait_for(chunks.__anext__(), 5) == b"two"
        with pytest.raises(StopAsyncIteration):
            await chunks.__anext__()


async def test_request_body_query_and_status_pass_through(client: httpx.AsyncClient) -> None:
    r = await client.post("/echo?x=1", content=b"abc")
    assert (r.status_code, r.content) == (201, b"cbax=1")


async def test_an_exception_before_the_response_reaches_the_caller() -> None:
    async with httpx.AsyncClient(transport=StreamingASGITransport(raw_app_that_raises),
                                 base_url="http://x") as c:
        with pytest.raises(ValueError, match="broken before answering"):
            await c.get("/")


async def test_an_exception_midway_breaks_the_stream(client: httpx.AsyncClient) -> None:
    async with client.stream("GET", "/fails-midway") as r:
        assert r.status_code == 200
        with pytest.raises(RuntimeError, match="the model crashed"):
            async for _ in r.aiter_raw():
                pass


async def test_a_caller_that_leaves_stops_the_response(client: httpx.AsyncClient,
                                                       state: State) -> None:
    async with client.stream("GET", "/endless") as r:
        async for chunk in r.aiter_raw():
            assert chunk.startswith(b"tick")
            break
    await asyncio.wait_for(state.stopped.wait(), 5)


async def test_work_after_the_response_still_runs(client: httpx.AsyncClient,
                                                  state: State) -> None:
    r = await client.get("/then-more")
    assert r.content == b"done"
    await asyncio.wait_for(state.after.wait(), 5)


async def test_a_caller_cancelled_before_the_response_cancels_the_app() -> None:
    entered, cancelled = asyncio.Event(), asyncio.Event()

    async def slow_app(scope: object, receive: object, send: object) -> None:
        entered.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with httpx.AsyncClient(transport=StreamingASGITransport(slow_app),
                                 base_url="http://x") as c:
        call = asyncio.create_task(c.get("/"))
        await asyncio.wait_for(entered.wait(), 5)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    await asyncio.wait_for(cancelled.wait(), 5)
