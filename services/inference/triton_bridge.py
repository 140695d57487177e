"""A replica of the `triton` runtime: the worker's OpenAI API (services.inference.worker's app,
its request checks, response shapes and errors) on a local port, with engines whose calls go to
a model on a Triton server (services/inference/triton_model.py is what that model runs).

Embeddings are KServe v2 `infer` calls through tritonclient's asyncio client (split into
batches of the model's max_batch_size; Triton batches them again across requests). Chat and
completions use Triton's generate extension (`generate`, `generate_stream` as server-sent
events), which a decoupled model needs and tritonclient does not cover, through httpx. The
bridge's /health answers 503 until Triton and the model are ready (it loads the model first
when asked: model control mode explicit)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import orjson
import uvicorn
from fastapi.responses import JSONResponse, Response, StreamingResponse
from tritonclient.http import InferInput, InferRequestedOutput
from tritonclient.http.aio import InferenceServerClient

from services.inference.worker import (
    ChatEngine,
    ChatRequest,
    CompletionRequest,
    EmbeddingEngine,
    EmbeddingRequest,
    OpenAIError,
    SamplingRequest,
    _EmbedItem,
    _envelope,
    _one_line,
    _setup_logging,
    _sse,
    _usage,
    create_app,
)

log = logging.getLogger("wb.inference.triton_bridge")

SAMPLING_FIELDS = {"max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed",
                   "n", "presence_penalty", "frequency_penalty", "logit_bias", "response_format"}


def triton_error(message: str, status: int = 502) -> OpenAIError:
    """A Triton error as an OpenAI error: the model's own OpenAI error body (JSON in the message,
    services/inference/triton_model.py) as it is, anything else from Triton as a server error."""
    with contextlib.suppress(ValueError, TypeError, AttributeError, KeyError):
        body = orjson.loads(message)
        err = body["error"]
        return OpenAIError(str(err["message"]), err.get("param"), err.get("code"),
                           int(body.get("status", 400)), str(err.get("type") or
                                                             "invalid_request_error"))
    return OpenAIError(f"triton: {message}", None, "triton_error", 502 if status < 500 else status,
                       "server_error")


class TritonModel:
    """One model on a Triton server: readiness (watched in the background), its config, and the
    clients that reach it."""

    def __init__(self, url: str, model: str, *, load: bool, timeout: float) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        self.url, self.model, self.load = f"{parts.scheme}://{parts.netloc}", model, load
        self._netloc, self._https, self._timeout = parts.netloc, parts.scheme == "https", timeout
        self.http = httpx.AsyncClient(base_url=self.url, trust_env=False,
                                      timeout=httpx.Timeout(timeout, connect=5.0))
        self.ready = False
        self.reason = f"waiting for Triton at {self.url}"
        self.config: dict[str, Any] | None = None
        self.configured = asyncio.Event()
        self.client: InferenceServerClient
        self.probe: InferenceServerClient

    def check(self) -> None:
        if not self.ready:
            raise OpenAIError(self.reason, None, "triton_unavailable", 503, "server_error")

    async def watch(self, interval: float = 2.0, load_retry: float = 10.0) -> None:
        """Loads the model when asked (again after `load_retry` while that fails), then follows
        the server's and the model's readiness."""
        # tritonclient's asyncio clients need the running loop: made here, closed by close().
        self.client = InferenceServerClient(self._netloc, ssl=self._https,
                                            conn_timeout=self._timeout)
        self.probe = InferenceServerClient(self._netloc, ssl=self._https, conn_timeout=10.0)
        loaded, next_load = not self.load, 0.0
        while True:
            ready, reason = False, self.reason
            try:
                # Live, not ready: with strict readiness (the default) a server is not ready
                # while any of its models loads or unloads, which says nothing of this one.
                if not await self.probe.is_server_live():
                    reason = f"Triton at {self.url} is not live"
                elif await self.probe.is_model_ready(self.model):
                    loaded, ready = True, True
                    if self.config is None:
                        self.config = await self.probe.get_model_config(self.model)
                        self.configured.set()
                elif not loaded and time.monotonic() >= next_load:
                    self.reason = f"loading model {self.model!r} on Triton at {self.url}"
                    next_load = time.monotonic() + load_retry
                    await self.client.load_model(self.model)
                    continue
                elif loaded:
                    reason = f"model {self.model!r} is not ready on Triton at {self.url}"
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                msg = exc.message() if hasattr(exc, "message") else _one_line(exc)
                reason = f"Triton at {self.url} ({self.model!r}): {msg}"
            if reason != self.reason and not ready:
                log.warning("%s", reason)
            self.ready, self.reason = ready, reason
            await asyncio.sleep(interval)

    def parameter(self, key: str, default: str = "") -> str:
        params = (self.config or {}).get("parameters", {})
        return str(params.get(key, {}).get("string_value", default))

    async def close(self) -> None:
        for client in (getattr(self, "client", None), getattr(self, "probe", None)):
            if client is not None:
                await client.close()
        await self.http.aclose()


class TritonChatEngine(ChatEngine):
    """ChatEngine's API with generation on Triton: the model checks the request with the
    worker's own code and counts the tokens; the bridge shapes the OpenAI responses."""

    def __init__(self, triton: TritonModel, name: str, path: Path) -> None:
        # No super().__init__: that loads the model, which Triton holds.
        self.triton, self.name, self.path = triton, name, path
        self.inflight = 0

    @property
    def n_ctx(self) -> int:  # type: ignore[override]
        return int(self.triton.parameter("n_ctx", "0"))

    def health(self) -> dict[str, Any]:
        self.triton.check()
        return {"queue_depth": self.inflight, "busy": self.inflight > 0, "n_ctx": self.n_ctx,
                "triton": {"url": self.triton.url, "model": self.triton.model}}

    def _body(self, req: SamplingRequest) -> dict[str, Any]:
        params = req.model_dump(include=SAMPLING_FIELDS, exclude_none=True)
        return {"sampling_parameters": orjson.dumps(params).decode(), "stream": req.stream}

    async def chat(self, req: ChatRequest, tenant: str) -> Response:
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        body = self._body(req) | {"messages": orjson.dumps(messages).decode()}
        return await self._generate_on_triton(req, body, chat=True)

    async def complete(self, req: CompletionRequest, tenant: str) -> Response:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) > 1:
                raise OpenAIError("Invalid 'prompt': one prompt per request.", "prompt",
                                  "unsupported_value")
            prompt = prompt[0]
        body = self._body(req)
        if isinstance(prompt, str):
            body["text_input"] = prompt
        else:
            body["input_ids"] = [int(t) for t in prompt]
        return await self._generate_on_triton(req, body, chat=False)

    async def _generate_on_triton(self, req: SamplingRequest, body: dict[str, Any],
                                  chat: bool) -> Response:
        self.triton.check()
        path = f"/v2/models/{self.triton.model}/generate"
        if not req.stream:
            self.inflight += 1
            try:
                r = await self.triton.http.post(path, json=body)
            except httpx.HTTPError as exc:
                raise triton_error(_one_line(exc)) from exc
            finally:
                self.inflight -= 1
            data = r.json()
            if r.status_code != 200 or "error" in data:
                raise triton_error(str(data.get("error", r.text)), r.status_code)
            if chat:
                choice: dict[str, Any] = {"index": 0, "message": {
                    "role": "assistant", "content": data["text_output"]}}
            else:
                choice = {"index": 0, "text": data["text_output"]}
            choice |= {"logprobs": None, "finish_reason": data["finish_reason"]}
            return JSONResponse(_envelope(chat, False, [choice], self.name) | {
                "usage": _usage(int(data["prompt_tokens"]), int(data["completion_tokens"]))})
        events = self._events(path + "_stream", body)
        # The first event decides: a request the model refused is answered as an error, not
        # as a stream (as the worker does).
        try:
            first = await anext(events)
        except StopAsyncIteration:
            first = {"error": "the stream ended without a response"}
        if "error" in first:
            await events.aclose()
            raise triton_error(str(first["error"]))
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(self._relay(first, events, chat, usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _events(self, path: str, body: dict[str, Any]
                      ) -> AsyncGenerator[dict[str, Any], None]:
        """The server-sent events of a generate_stream call, as dicts."""
        self.inflight += 1
        try:
            async with self.triton.http.stream("POST", path, json=body) as r:
                if r.status_code != 200:
                    # A refused request: {"error"} as JSON, or as an event of the stream.
                    text = (await r.aread()).decode(errors="replace").strip()
                    with contextlib.suppress(ValueError, AttributeError):
                        text = str(orjson.loads(text.removeprefix("data:")).get("error", text))
                    yield {"error": text}
                    return
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        yield orjson.loads(line[5:])
        except httpx.HTTPError as exc:
            yield {"error": _one_line(exc)}
        finally:
            self.inflight -= 1

    async def _relay(self, first: dict[str, Any], events: AsyncGenerator[dict[str, Any], None],
                     chat: bool, include_usage: bool) -> AsyncIterator[bytes]:
        head = _envelope(chat, True, [], self.name) | ({"usage": None} if include_usage else {})

        def chunk(text: str | None, finish: str | None, role: bool = False) -> bytes:
            if chat:
                delta = ({"role": "assistant"} if role else {}) | (
                    {} if text is None else {"content": text})
                choice: dict[str, Any] = {"index": 0, "delta": delta}
            else:
                choice = {"index": 0, "text": text or ""}
            return _sse(head | {"choices": [choice | {"logprobs": None,
                                                      "finish_reason": finish}]})

        async def all_events() -> AsyncIterator[dict[str, Any]]:
            yield first
            async for event in events:
                yield event

        try:
            if chat:
                yield chunk("", None, role=True)
            async for event in all_events():
                if "error" in event:
                    yield _sse(triton_error(str(event["error"])).body())
                    return
                if event.get("text_output"):
                    yield chunk(event["text_output"], None)
                if event.get("finish_reason"):
                    yield chunk(None, event["finish_reason"])
                    if include_usage:
                        yield _sse(head | {"choices": [], "usage": _usage(
                            int(event["prompt_tokens"]), int(event["completion_tokens"]))})
                    yield b"data: [DONE]\n\n"
                    return
            yield _sse(triton_error("the stream ended before the generation did").body())
        finally:
            await events.aclose()

    async def run(self) -> None:
        try:
            await self.triton.watch()
        finally:
            await self.triton.close()

    def close(self) -> None:
        return None


class TritonEmbeddingEngine(EmbeddingEngine):
    """EmbeddingEngine's checks, batching and response shaping; the encoding is Triton's."""

    def __init__(self, triton: TritonModel, name: str, path: Path) -> None:
        # No super().__init__: that loads the model, which Triton holds.
        self.triton, self.name, self.path = triton, name, path
        # max_batch is set from the model's config once it is read; requests waiting together
        # are collected up to max_collect inputs and sent in max_batch_size pieces.
        self.max_batch, self.max_collect, self.wait_s = 1, 512, 0.0
        self.busy = False
        self._pending: deque[_EmbedItem] = deque()
        self._pending_n = 0
        self._wake = asyncio.Event()

    @property
    def n_ctx(self) -> int:  # type: ignore[override]
        return int(self.triton.parameter("context_length", "0"))

    @property
    def dimensions(self) -> int:  # type: ignore[override]
        self.triton.check()
        outputs = (self.triton.config or {}).get("output", [])
        dims = next((o["dims"] for o in outputs if o["name"] == "embedding"), [-1])
        return int(dims[-1])

    def health(self) -> dict[str, Any]:
        self.triton.check()
        return {"queue_depth": len(self._pending), "busy": self.busy, "n_ctx": self.n_ctx,
                "dimensions": self.dimensions,
                "triton": {"url": self.triton.url, "model": self.triton.model}}

    async def _infer(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        data = np.array([t.encode() for t in texts], dtype=np.object_).reshape(-1, 1)
        text_input = InferInput("text_input", list(data.shape), "BYTES")
        text_input.set_data_from_numpy(data)
        result = await self.triton.client.infer(
            self.triton.model, [text_input],
            outputs=[InferRequestedOutput("embedding"), InferRequestedOutput("token_count")])
        vectors = result.as_numpy("embedding")
        counts = result.as_numpy("token_count")
        if vectors is None or counts is None or len(vectors) != len(texts):
            raise RuntimeError("Triton's answer lacks the embeddings of some inputs")
        return vectors, [int(c) for c in counts.reshape(-1)]

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_EmbedItem]) -> None:
        texts = [t for it in batch for t in it.texts]
        step = max(1, int((self.triton.config or {}).get("max_batch_size") or 1))
        self.busy = True
        try:
            parts = await asyncio.gather(*(self._infer(texts[i:i + step])
                                           for i in range(0, len(texts), step)))
        except Exception as exc:
            msg = exc.message() if hasattr(exc, "message") else _one_line(exc)
            log.error("encoding on Triton failed: %s", msg)
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(triton_error(f"encoding failed: {msg}"))
            return
        finally:
            self.busy = False
        vectors = np.concatenate([v for v, _ in parts])
        counts = [c for _, cs in parts for c in cs]
        start = 0
        for it in batch:
            end = start + len(it.texts)
            if not it.future.done():
                it.future.set_result((vectors[start:end], sum(counts[start:end])))
            start = end

    async def embed(self, req: EmbeddingRequest) -> Response:
        self.triton.check()
        return await super().embed(req)

    async def run(self) -> None:
        async def batches() -> None:
            await self.triton.configured.wait()
            self.max_batch = int((self.triton.config or {}).get("max_batch_size") or 1)
            self.max_collect = max(self.max_collect, self.max_batch)
            await super(TritonEmbeddingEngine, self).run()

        try:
            await asyncio.gather(self.triton.watch(), batches())
        finally:
            await self.triton.close()

    def close(self) -> None:
        return None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.inference.triton_bridge",
                                description="The OpenAI API in front of a model on Triton.")
    p.add_argument("--kind", choices=("chat", "embedding"), required=True)
    p.add_argument("--triton-url", required=True, help="Triton's HTTP endpoint")
    p.add_argument("--triton-model", required=True, help="the model's name on Triton")
    p.add_argument("--load", action="store_true",
                   help="load the model (model control mode explicit) unless it is ready")
    p.add_argument("--model-name", required=True, help="the model id answered")
    p.add_argument("--model-file", required=True, type=Path,
                   help="the model's file: its time is the model's `created`")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--timeout", type=float, default=600.0, help="longest call to Triton (s)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    _setup_logging(args.kind, args.port)
    log.setLevel(logging.INFO)
    triton = TritonModel(args.triton_url, args.triton_model, load=args.load,
                         timeout=args.timeout)
    engine: TritonChatEngine | TritonEmbeddingEngine = (
        TritonChatEngine if args.kind == "chat" else TritonEmbeddingEngine)(
        triton, args.model_name, args.model_file)
    log.info("bridge for %s model %r on Triton at %s serving on %s:%d (pid %d)", args.kind,
             args.triton_model, triton.url, args.host, args.port, os.getpid())
    uvicorn.Server(uvicorn.Config(
        create_app(engine), host=args.host, port=args.port, log_config=None,
        log_level="warning", access_log=False, loop="auto", timeout_graceful_shutdown=5)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
