"""An httpx transport into an ASGI app in this process that streams the response: the embedded
mode's service-to-service calls (the kb service streaming an answer from the inference service).
httpx's own `ASGITransport` runs the app to its end and hands back the whole body at once, so a
streamed answer arrived in one piece; here the caller gets the status and headers as soon as the
app sends them and each body chunk as it is written."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import httpx
from starlette.types import ASGIApp

log = logging.getLogger("workbench.asgi_transport")
_END = object()
# How long a response the caller left is given to notice (`http.disconnect`) before it is
# cancelled.
DISCONNECT_GRACE_S = 5.0


class _BodyStream(httpx.AsyncByteStream):
    """The response body as the app writes it; closing it early tells the app the client
    left (`http.disconnect`) and waits for the app to finish."""

    def __init__(self, chunks: asyncio.Queue[Any], task: asyncio.Task[None],
                 finished: asyncio.Event, over: asyncio.Event) -> None:
        self._chunks, self._task, self._finished, self._over = chunks, task, finished, over

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            item = await self._chunks.get()
            if item is _END:
                break
            if isinstance(item, BaseException):
                raise item
            yield item

    async def aclose(self) -> None:
        if self._task.done() or self._finished.is_set():
            return  # what runs after the last chunk (background tasks) goes on by itself
        self._over.set()
        # A streaming response stops when it sees the disconnect; one that does not listen
        # for it is stopped after a grace period.
        try:
            await asyncio.wait_for(asyncio.shield(self._task), DISCONNECT_GRACE_S)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


class StreamingASGITransport(httpx.AsyncBaseTransport):
    """Like `httpx.ASGITransport` (same scope; an exception the app raises before it starts a
    response is raised to the caller), but the body streams."""

    def __init__(self, app: ASGIApp, client: tuple[str, int] = ("127.0.0.1", 123)) -> None:
        self.app = app
        self.client = client
        self._tasks: set[asyncio.Task[None]] = set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": request.method,
            "headers": [(k.lower(), v) for k, v in request.headers.raw],
            "scheme": request.url.scheme, "path": request.url.path,
            "raw_path": request.url.raw_path.split(b"?")[0],
            "query_string": request.url.query,
            "server": (request.url.host, request.url.port),
            "client": self.client, "root_path": "",
        }
        body_in = request.stream.__aiter__()
        request_done = False
        chunks: asyncio.Queue[Any] = asyncio.Queue()
        started = asyncio.get_running_loop().create_future()
        finished = asyncio.Event()  # the app wrote its last chunk
        over = asyncio.Event()  # the app finished or the caller closed the response

        async def receive() -> dict[str, Any]:
            nonlocal request_done
            if not request_done:
                try:
                    body = await body_in.__anext__()
                except StopAsyncIteration:
                    request_done = True
                    return {"type": "http.request", "body": b"", "more_body": False}
                return {"type": "http.request", "body": body, "more_body": True}
            await over.wait()
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                if not started.done():
                    started.set_result((message["status"], message.get("headers", [])))
            elif message["type"] == "http.response.body":
                if finished.is_set():
                    return
                body = message.get("body", b"")
                if body and request.method != "HEAD" and not over.is_set():
                    chunks.put_nowait(bytes(body))
                if not message.get("more_body", False):
                    finished.set()
                    over.set()
                    chunks.put_nowait(_END)

        async def run() -> None:
            try:
                await self.app(scope, receive, send)
            except BaseException as exc:
                if not started.done():
                    if isinstance(exc, asyncio.CancelledError):
                        started.cancel()  # the caller, if still waiting, is cancelled too
                    else:
                        started.set_exception(exc)
                elif not finished.is_set():
                    chunks.put_nowait(exc if isinstance(exc, Exception) else
                                      httpx.ReadError("the app stopped mid-response"))
                elif isinstance(exc, Exception):  # after the response: nobody else sees it
                    log.error("in-process call %s %s failed after its response",
                              request.method, request.url.path, exc_info=exc)
                if not isinstance(exc, Exception):
                    raise
            else:
                if not started.done():
                    started.set_exception(RuntimeError("the app returned without a response"))
            finally:
                if not finished.is_set():
                    finished.set()
                    over.set()
                    chunks.put_nowait(_END)

        task = asyncio.create_task(run())
        self._tasks.add(task)  # referenced until done, also when the caller has moved on
        task.add_done_callback(self._tasks.discard)
        try:
            status, headers = await asyncio.shield(started)
        except BaseException:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            raise
        return httpx.Response(status, headers=headers,
                              stream=_BodyStream(chunks, task, finished, over))
