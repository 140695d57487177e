"""The app factory: every service is built here, so every service has the same health, readiness,
metrics, tracing, logging and error format."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import iter_route_contexts
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from workbench.errors import WorkbenchError
from workbench.middleware import RequestMiddleware
from workbench.observability import setup_logging, setup_tracing
from workbench.problems import (
    PROBLEM_CONTENT_TYPE,
    Problem,
    is_openai_path,
    openai_error_body,
    problem_body,
)
from workbench.settings import CoreSettings

log = logging.getLogger("workbench.app")

ReadinessCheck = Callable[[], Awaitable[None]]
Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_CONTENT_TYPE

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def problem(status: int, code: str, title: str, detail: str, *,
            headers: dict[str, str] | None = None, **extra: Any) -> ProblemResponse:
    return ProblemResponse(problem_body(status, code, title, detail, **extra), status_code=status,
                           headers=headers)


_HTTP_TITLES = {
    400: ("bad_request", "Bad request"),
    401: ("unauthorized", "Unauthorized"),
    403: ("forbidden", "Forbidden"),
    404: ("not_found", "Not found"),
    405: ("method_not_allowed", "Method not allowed"),
    406: ("not_acceptable", "Not acceptable"),
    413: ("payload_too_large", "Payload too large"),
    415: ("unsupported_media_type", "Unsupported media type"),
}


def _field_path(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or "body"


def error_response(request: Request, status: int, code: str, title: str, detail: str, *,
                   headers: dict[str, str] | None = None, **extra: Any) -> Response:
    """problem+json — or, on the OpenAI-compatible routes (/v1/…), OpenAI's error shape, which
    their clients parse (the gateway answers those paths the same way)."""
    if is_openai_path(request.url.path):
        param = extra.get("param") or extra.get("field")
        return JSONResponse(openai_error_body(status, code, detail, param=param),
                            status_code=status, headers=headers)
    return problem(status, code, title, detail, headers=headers, **extra)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(WorkbenchError)
    async def on_domain_error(request: Request, exc: WorkbenchError) -> Response:
        return error_response(request, exc.status, exc.code, exc.title, exc.detail,
                              headers=exc.headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        for err in errors:
            if err.get("type") == "json_invalid":
                ctx = err.get("ctx") or {}
                return error_response(
                    request, 400, "malformed_json", "Malformed JSON",
                    f"request body is not valid JSON: {ctx.get('error', 'parse error')}"
                    f" at position {err.get('loc', ['', '?'])[-1]}")
        fields = [
            {"field": _field_path(e.get("loc", ())), "message": e.get("msg", ""),
             "type": e.get("type", "")}
            for e in errors
        ]
        summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:5])
        if is_openai_path(request.url.path):  # OpenAI's clients know 400 for bad values
            return error_response(request, 400, "invalid_request", "Bad request", summary,
                                  param=fields[0]["field"] if fields else None)
        return problem(422, "validation_failed", "Validation failed", summary, errors=fields)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code, title = _HTTP_TITLES.get(exc.status_code, ("http_error", "HTTP error"))
        detail = exc.detail if isinstance(exc.detail, str) else title
        if exc.status_code == 405:
            # Starlette names only the first matching route's methods; RFC 9110 wants all.
            allowed = _allowed_methods(request)
            detail = f"{request.method} is not allowed here; use {', '.join(allowed)}"
            return error_response(request, 405, code, title, detail,
                                  headers={"allow": ", ".join(allowed)})
        if exc.status_code == 404 and detail == "Not Found":
            detail = "no such route; see /docs for the API"
        if exc.status_code == 400 and "parsing the body" in detail:
            code, title = "malformed_body", "Malformed body"
        return error_response(request, exc.status_code, code, title, detail,
                              headers=dict(exc.headers) if exc.headers else None)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.error("unhandled error", exc_info=exc)
        return error_response(request, 500, "internal_error", "Internal error",
                              "the server failed to handle this request; it has been logged "
                              "under the request id")


def iter_routes(app: FastAPI) -> list[tuple[str, frozenset[str]]]:
    """Every (path, methods) an app serves, included routers flattened."""
    out = []
    for rc in iter_route_contexts(app.routes):
        if rc.path is not None:
            out.append((rc.path, frozenset(rc.methods or ())))
    return out


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for path, route_methods in iter_routes(request.app):
        if compile_path(path)[0].match(request.url.path):
            methods |= route_methods
    return sorted(methods)


def create_app(
    *,
    service: str,
    settings: CoreSettings,
    routers: Sequence[APIRouter] = (),
    lifespan: Lifespan | None = None,
    readiness: dict[str, ReadinessCheck] | None = None,
    title: str | None = None,
    description: str = "",
    version: str = "0.1.0",
    body_limit_overrides: dict[str, int] | None = None,
    openapi_tags: list[dict[str, Any]] | None = None,
    openapi_url: str | None = "/openapi.json",
    docs_url: str | None = "/docs",
    with_middleware: bool = True,
) -> FastAPI:
    """Build a service app. `readiness` checks (DB, bus, stores) may also be registered later
    on `app.state.readiness` from the lifespan, once the clients exist."""
    setup_logging(service, settings.log_level, settings.log_json)
    setup_tracing(service, settings.trace_export)

    @asynccontextmanager
    async def app_lifespan(app: FastAPI) -> AsyncIterator[None]:
        if lifespan is None:
            yield
            return
        async with lifespan(app):
            yield

    app = FastAPI(
        title=title or f"xai-workbench {service} service",
        description=description,
        version=version,
        lifespan=app_lifespan,
        openapi_tags=openapi_tags,
        openapi_url=openapi_url,
        docs_url=docs_url,
        redoc_url=None,
        # RequestMiddleware opens the request's span (its ids go into the logs, the events
        # and the calls onward): FastAPI's own spans would only wrap it in a second server
        # span and an operation span per request, for a measurable share of a short request.
        telemetry={"tracing": False, "operation_spans": False},
    )
    app.state.service = service
    app.state.settings = settings
    app.state.readiness = dict(readiness or {})
    install_error_handlers(app)

    @app.get("/healthz", tags=["ops"], summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": service}

    @app.get("/readyz", tags=["ops"], summary="Readiness: every dependency answers",
             responses={503: {"description": "A dependency is down"}})
    async def readyz() -> Response:
        checks: dict[str, str] = {}
        ok = True
        for name, check in app.state.readiness.items():
            try:
                await asyncio.wait_for(check(), timeout=3.0)
                checks[name] = "ok"
            except Exception as exc:
                ok = False
                checks[name] = f"failed: {type(exc).__name__}: {exc}"[:300]
        if ok:
            return JSONResponse({"status": "ready", "service": service, "checks": checks})
        return problem(503, "not_ready", "Not ready",
                       "; ".join(f"{k} {v}" for k, v in checks.items() if v != "ok"),
                       checks=checks)

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    for router in routers:
        app.include_router(router)
    _document_problem_schema(app)
    if not with_middleware:  # the caller wraps the app itself (the gateway)
        return app
    app.add_middleware(
        RequestMiddleware,
        service=service,
        max_body_bytes=settings.max_body_bytes,
        body_limit_overrides=body_limit_overrides,
        log_access=settings.access_log,
    )
    return app


def _document_problem_schema(app: FastAPI) -> None:
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = build()
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            schemas["Problem"] = Problem.model_json_schema(
                ref_template="#/components/schemas/{model}")
            for path in spec.get("paths", {}).values():
                for op in path.values():
                    for response in op.get("responses", {}).values():
                        content = response.get("content", {})
                        # FastAPI adds a bare application/json entry next to ours.
                        if PROBLEM_CONTENT_TYPE in content and content.get(
                            "application/json"
                        ) in ({}, {"schema": {}}):
                            content.pop("application/json")
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
