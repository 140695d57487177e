"""The OpenAI-compatible API (`/v1/models`, `/v1/chat/completions`, `/v1/completions`,
`/v1/embeddings`): the model name resolves to a route or a deployment of the caller's org, the
org's token quota and safety rules apply, and the request is proxied to a ready replica —
streams included, with time to first token, tokens and usage metered. Errors use OpenAI's
shape so the official clients understand them."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import aiohttp
import orjson
from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.inference import safety
from services.inference.runtimes.base import Replica
from services.inference.service import InferenceService
from services.inference.supervisor import NoReplica
from services.inference.usage import Call, Metering
from workbench.errors import WorkbenchError
from workbench.identity.deps import require
from workbench.identity.principal import Principal, Role
from workbench.internal import InternalDep, principal_on_behalf
from workbench.problems import openai_error_body

router = APIRouter(prefix="/v1", tags=["openai-compatible"])
# Other services (the kb service's embeddings and answers) call models on behalf of an org: the
# same proxy, quota, safety rules and metering, the caller proven by the internal token.
internal_router = APIRouter(prefix="/internal/v1/orgs/{org_id}", dependencies=[InternalDep],
                            include_in_schema=False)
Caller = Annotated[Principal, require("inference:execute")]
Reader = Annotated[Principal, require("inference:read")]


class OpenAIError(WorkbenchError):
    """An error for the /v1 routes, with OpenAI's `param`."""

    def __init__(self, status: int, code: str, message: str, *, param: str | None = None
                 ) -> None:
        super().__init__(message, code=code, extra={"param": param} if param else None)
        self.status = status


# ---- request bodies (what the service itself checks; the rest goes to the replica) ----------

class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=200)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None


class ChatRequest(_Common):
    messages: list[dict[str, Any]] = Field(min_length=1)
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Common):
    prompt: str | list[str]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=200)
    input: str | list[str] = Field(min_length=1)
    encoding_format: str | None = None


async def _body(request: Request, model: type[BaseModel]) -> Any:
    raw = await request.body()
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise OpenAIError(400, "invalid_json", f"the request body is not valid JSON: {exc}"
                          ) from exc
    if not isinstance(data, dict):
        raise OpenAIError(400, "invalid_request", "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(x) for x in err.get("loc", ())) or None
        raise OpenAIError(400, "invalid_value" if err["type"] != "missing"
                          else "missing_required_parameter",
                          f"{param}: {err['msg']}" if param else err["msg"], param=param
                          ) from exc


def svc(request: Request) -> InferenceService:
    service: InferenceService = request.app.state.inference_service
    return service


def metering(request: Request) -> Metering:
    m: Metering = request.app.state.metering
    return m


# ---- routes -----------------------------------------------------------------------------------

@router.get("/models", summary="Models this organization can call (deployments and routes)")
async def list_models(p: Reader, request: Request) -> Any:
    async with svc(request).db.transaction() as s:
        data = await svc(request).served_models(s, p)
    return {"object": "list", "data": data}


@router.post("/chat/completions", summary="Chat completion (OpenAI-compatible; SSE with stream)",
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": {"type": "object"}, "example": {
                     "model": "assistant", "messages": [{"role": "user", "content": "Hi"}],
                     "max_tokens": 64, "stream": False}}}}})
async def chat_completions(p: Caller, request: Request) -> Response:
    body: ChatRequest = await _body(request, ChatRequest)
    return await _serve(request, p, body, "chat/completions")


@router.post("/completions", summary="Text completion (OpenAI-compatible; SSE with stream)",
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": {"type": "object"}, "example": {
                     "model": "assistant", "prompt": "Once upon a time", "max_tokens": 32}}}}})
async def completions(p: Caller, request: Request) -> Response:
    body: CompletionRequest = await _body(request, CompletionRequest)
    return await _serve(request, p, body, "completions")


@router.post("/embeddings", summary="Embeddings (OpenAI-compatible)",
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": {"type": "object"}, "example": {
                     "model": "embedder", "input": ["first sentence", "second sentence"]}}}}})
async def embeddings(p: Caller, request: Request) -> Response:
    body: EmbeddingRequest = await _body(request, EmbeddingRequest)
    return await _serve(request, p, body, "embeddings")


@internal_router.post("/embeddings")
async def internal_embeddings(org_id: uuid.UUID, request: Request,
                              x_wb_on_behalf_of: Annotated[str | None, Header()] = None
                              ) -> Response:
    body: EmbeddingRequest = await _body(request, EmbeddingRequest)
    p = principal_on_behalf(org_id, x_wb_on_behalf_of, Role.MEMBER)
    return await _serve(request, p, body, "embeddings")


@internal_router.post("/chat/completions")
async def internal_chat_completions(org_id: uuid.UUID, request: Request,
                                    x_wb_on_behalf_of: Annotated[str | None, Header()] = None
                                    ) -> Response:
    body: ChatRequest = await _body(request, ChatRequest)
    p = principal_on_behalf(org_id, x_wb_on_behalf_of, Role.MEMBER)
    return await _serve(request, p, body, "chat/completions")


# ---- the proxy ---------------------------------------------------------------------------------

# Replica calls and stream reads go through aiohttp: its C parser costs a quarter of httpx's
# CPU per call on the service's event loop (measured: 0.3 vs 1.0-1.2 ms a call on 2 cores).
REPLICA_ERRORS = (aiohttp.ClientError, TimeoutError)


def replica_session(read_timeout_s: float) -> aiohttp.ClientSession:
    """The pooled client for the replicas (built inside the service's event loop)."""
    return aiohttp.ClientSession(
        # Idle connections go before the replicas' own 5 s keep-alive ends, so a request
        # never goes out on a connection the replica is closing.
        connector=aiohttp.TCPConnector(limit=512, keepalive_timeout=4.0),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0,
                                      sock_read=read_timeout_s),
        # One session serves every org: it must never keep a replica's cookies.
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent",))


async def _lines(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """The lines of a response body as they arrive, whatever their length (aiohttp's own
    line reader stops at 64 KiB; pieces of a long line are joined once) and their ending
    (\n or \r\n)."""
    pending: list[bytes] = []
    async for data in content.iter_any():
        *lines, last = data.split(b"\n")
        if lines:
            if pending:
                lines[0] = b"".join([*pending, lines[0]])
                pending = []
            for line in lines:
                yield line.rstrip(b"\r")
        if last:
            pending.append(last)
    if pending:
        yield b"".join(pending).rstrip(b"\r")


async def _serve(request: Request, p: Principal, body: BaseModel, endpoint: str) -> Response:
    service, meter = svc(request), metering(request)
    kind = "embedding" if endpoint == "embeddings" else "chat"
    await meter.check_quota(p.org_id)
    deployment_id, route, policy = await service.resolve(
        p, body.model, kind)  # type: ignore[attr-defined]
    payload = body.model_dump(exclude_none=True)
    call = meter.call(p, deployment_id=str(deployment_id), model=body.model,  # type: ignore[attr-defined]
                      route=route, endpoint=endpoint)
    if not policy.empty and kind == "chat":
        payload = await _guard_input(call, policy, payload, endpoint)
    try:
        replica = service.supervisor.pick(str(deployment_id))
    except NoReplica as exc:
        call.finish(ok=False)
        raise OpenAIError(503, "model_unavailable", str(exc)) from exc
    if replica.remote_model:
        payload["model"] = replica.remote_model
    if payload.get("stream"):
        wants_usage = bool((payload.get("stream_options") or {}).get("include_usage"))
        payload["stream_options"] = {"include_usage": True}
        return StreamingResponse(
            _stream(request, call, replica, endpoint, payload, policy, wants_usage),
            media_type="text/event-stream", headers={"cache-control": "no-cache"})
    return await _once(request, call, replica, endpoint, payload, policy)


async def _guard_input(call: Call, policy: safety.Policy, payload: dict[str, Any],
                       endpoint: str) -> dict[str, Any]:
    if endpoint == "chat/completions":
        verdict, messages = policy.check_messages(payload["messages"])
        payload["messages"] = messages
    else:
        prompts = payload["prompt"] if isinstance(payload["prompt"], list) else [
            payload["prompt"]]
        verdicts = [policy.check(t, "input") for t in prompts]
        verdict = safety.Verdict(blocked=any(v.blocked for v in verdicts),
                                 text="", hits=[h for v in verdicts for h in v.hits],
                                 blocked_by=next((v.blocked_by for v in verdicts
                                                  if v.blocked_by), None))
        texts = [v.text for v in verdicts]
        payload["prompt"] = texts if isinstance(payload["prompt"], list) else texts[0]
    await call.safety_hits(verdict.hits)
    if verdict.blocked and verdict.blocked_by is not None:
        call.finish(ok=False)
        raise OpenAIError(400, "content_blocked", f"the request was blocked by the "
                          f"organization's safety rule {verdict.blocked_by.rule_name!r}")
    return payload


async def _once(request: Request, call: Call, replica: Replica, endpoint: str,
                payload: dict[str, Any], policy: safety.Policy) -> Response:
    client: aiohttp.ClientSession = request.app.state.replica_http
    replica.inflight += 1
    try:
        async with client.post(f"{replica.base_url}/{endpoint}", data=orjson.dumps(payload),
                               headers=_headers(call, replica)) as r:
            status, content = r.status, await r.read()
    except REPLICA_ERRORS as exc:
        request.app.state.supervisor.mark_broken(replica, _reason(exc))
        call.finish(ok=False)
        raise OpenAIError(502, "replica_failed", "the model replica serving this request "
                          "failed while answering it; it is being replaced — retry") from exc
    finally:
        replica.inflight -= 1
    if status >= 400:
        call.finish(ok=False)
        return _passthrough_error(status, content)
    data = orjson.loads(content)  # orjson: embeddings answers are megabytes of floats
    usage = data.get("usage") or {}
    if not policy.empty and endpoint != "embeddings":
        for choice in data.get("choices", []):
            holder, key = (choice.get("message", {}), "content") if "message" in choice \
                else (choice, "text")
            verdict = policy.check(holder.get(key) or "", "output")
            await call.safety_hits(verdict.hits)
            if verdict.blocked and verdict.blocked_by is not None:
                call.finish(ok=False, prompt_tokens=usage.get("prompt_tokens", 0),
                            completion_tokens=usage.get("completion_tokens", 0))
                raise OpenAIError(400, "content_blocked", "the model's answer was blocked by "
                                  f"the organization's safety rule "
                                  f"{verdict.blocked_by.rule_name!r}")
            holder[key] = verdict.text
    data["model"] = call.model
    call.finish(ok=True, prompt_tokens=usage.get("prompt_tokens", 0),
                completion_tokens=usage.get("completion_tokens", 0))
    return Response(orjson.dumps(data), media_type="application/json")


async def _stream(request: Request, call: Call, replica: Replica, endpoint: str,
                  payload: dict[str, Any], policy: safety.Policy, wants_usage: bool
                  ) -> AsyncIterator[bytes]:
    client: aiohttp.ClientSession = request.app.state.replica_http
    guard = None if policy.empty else policy.stream()
    usage: dict[str, Any] = {}
    first: float | None = None
    ok = False
    replica.inflight += 1
    try:
        async with client.post(f"{replica.base_url}/{endpoint}", data=orjson.dumps(payload),
                               headers=_headers(call, replica)) as r:
            if r.status >= 400:
                yield _sse(_error_from(r.status, await r.read()))
                return
            async for line in _lines(r.content):
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = orjson.loads(data)
                if chunk.get("usage"):
                    usage = chunk["usage"]
                    if not chunk.get("choices"):
                        if wants_usage:
                            chunk["model"] = call.model
                            yield _sse(chunk)
                        continue
                if first is None and _has_text(chunk):
                    first = time.perf_counter()
                if guard is not None:
                    try:
                        _guard_chunk(chunk, guard)
                    except safety.Blocked as blocked:
                        await call.safety_hits([blocked.hit, *guard.hits])
                        yield _sse(openai_error_body(
                            400, "content_blocked", "the model's answer was blocked by the "
                            f"organization's safety rule {blocked.hit.rule_name!r}"))
                        return
                chunk["model"] = call.model
                if not wants_usage:
                    chunk.pop("usage", None)
                yield _sse(chunk)
            ok = True
            if guard is not None:
                await call.safety_hits(guard.hits)
            yield b"data: [DONE]\n\n"
    except REPLICA_ERRORS as exc:
        request.app.state.supervisor.mark_broken(replica, _reason(exc))
        yield _sse(openai_error_body(502, "replica_failed", "the model replica serving this "
                                     "request failed mid-answer; it is being replaced — retry"))
    finally:
        replica.inflight -= 1
        call.finish(ok=ok, prompt_tokens=usage.get("prompt_tokens", 0),
                    completion_tokens=usage.get("completion_tokens", 0), first_token_at=first)


def _has_text(chunk: dict[str, Any]) -> bool:
    for c in chunk.get("choices", []):
        if (c.get("delta") or {}).get("content") or c.get("text"):
            return True
    return False


def _guard_chunk(chunk: dict[str, Any], guard: safety.StreamGuard) -> None:
    for c in chunk.get("choices", []):
        delta = c.get("delta")
        holder, key = (delta, "content") if delta is not None else (c, "text")
        piece = holder.get(key) or ""
        out = guard.feed(piece) if piece else ""
        if c.get("finish_reason"):
            out += guard.finish()
        if piece or out:
            holder[key] = out


def _headers(call: Call, replica: Replica) -> dict[str, str]:
    return {**replica.headers(), "content-type": "application/json",
            "x-wb-tenant": str(call.org_id), "x-request-id": call.request_id or uuid.uuid4().hex}


def _reason(exc: BaseException) -> str:
    """What the supervisor records of a failed call (aiohttp's timeouts say nothing)."""
    return str(exc) or type(exc).__name__


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _error_from(status: int, body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            return data
    except orjson.JSONDecodeError:
        pass
    return openai_error_body(status if status < 500 else 502, "replica_error",
                             f"the model replica answered {status}")


def _passthrough_error(status: int, content: bytes) -> Response:
    return JSONResponse(_error_from(status, content), status_code=status if status < 500 else 502)
