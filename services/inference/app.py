"""Builds the inference service app: the management API, the OpenAI-compatible API (with
OpenAI-shaped errors), the supervisor of the replicas, metering and metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.inference.api import router
from services.inference.events import Events
from services.inference.metrics import Metrics
from services.inference.models import EVENT_TABLES
from services.inference.openai_api import router as openai_router
from services.inference.runtimes.base import Runtime
from services.inference.runtimes.local import LocalRuntime
from services.inference.runtimes.remote import OpenAIRuntime, VllmRuntime
from services.inference.service import InferenceService
from services.inference.settings import InferenceSettings
from services.inference.supervisor import Supervisor
from services.inference.usage import Metering
from workbench.app import create_app as create_service_app
from workbench.client import ServiceClient
from workbench.db import Database
from workbench.errors import WorkbenchError
from workbench.events.bus import EventBus
from workbench.events.factory import bus_from_settings
from workbench.events.outbox import OutboxRelay
from workbench.identity.tokens import JwksSource, TokenVerifier, http_jwks_source
from workbench.internal import INTERNAL_TOKEN_HEADER
from workbench.problems import is_openai_path, openai_error_body

NAME = "inference"
MIGRATIONS = Path(__file__).parent / "migrations"


def create_app(settings: InferenceSettings | None = None, *, bus: EventBus | None = None,
               jwks: JwksSource | None = None,
               user_transport: httpx.AsyncBaseTransport | None = None) -> FastAPI:
    """`bus`, `jwks` and `user_transport` (the user service in process) are passed in embedded
    mode."""
    settings = settings or InferenceSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database.for_service(NAME, settings, settings)
        own_bus = bus is None
        event_bus = bus or bus_from_settings(settings, settings, name=NAME)
        if own_bus:
            await event_bus.start()
        events = Events()
        service: InferenceService | None = None

        async def on_status(deployment_id: str, status: str, reason: str) -> None:
            if service is not None:
                await service.record_status(deployment_id, status, reason)

        logs = settings.data_dir / "inference" / "replicas"
        runtimes: dict[str, Runtime] = {
            "local": LocalRuntime(logs, default_n_ctx=settings.inference_default_n_ctx,
                                  threads=settings.inference_worker_threads),
            "openai": OpenAIRuntime(), "vllm": VllmRuntime(logs)}
        supervisor = Supervisor(settings, runtimes, on_status)
        service = InferenceService(settings, db, supervisor, events)
        user_client = ServiceClient(
            "user", settings.user_url, transport=user_transport,
            default_headers={INTERNAL_TOKEN_HEADER: settings.internal_token.get_secret_value()})
        metrics = Metrics()
        relay = OutboxRelay(db, event_bus, EVENT_TABLES, batch_size=settings.outbox_batch_size,
                            poll_interval_s=settings.outbox_poll_interval_s)
        relay.start()
        replica_http = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.inference_request_timeout_s, connect=5.0),
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=128),
            trust_env=False)
        app.state.db = db
        app.state.inference_service = service
        app.state.supervisor = supervisor
        app.state.metrics = metrics
        app.state.metering = Metering(db, events, metrics, user_client,
                                      cache_s=settings.inference_quota_cache_s)
        app.state.replica_http = replica_http
        app.state.verifier = TokenVerifier(
            jwks or http_jwks_source(settings.jwks_url), issuer=settings.jwt_issuer,
            audience=settings.jwt_audience, leeway_s=settings.jwt_leeway_s,
            min_refresh_interval_s=settings.jwks_min_refresh_interval_s)
        app.state.readiness.update({"database": db.ping, "bus": event_bus.ping})
        if settings.inference_resume_deployments:
            await service.resume()
        try:
            yield
        finally:
            await supervisor.close()
            await replica_http.aclose()
            await relay.stop()
            if own_bus:
                await event_bus.close()
            await user_client.aclose()
            await db.dispose()

    app = create_service_app(
        service=NAME, settings=settings, routers=[router, openai_router], lifespan=lifespan,
        title="xai-workbench inference service",
        description="Serves models: a catalog of built-in and external models, deployments on "
                    "local, OpenAI-compatible and vLLM runtimes with health checks, an "
                    "OpenAI-compatible API, traffic splitting, metrics, metering and content "
                    "safety.")
    _openai_errors(app)
    return app


def _openai_errors(app: FastAPI) -> None:
    """On /v1/… the library's problem+json errors become OpenAI's error shape."""
    defaults: dict[Any, Any] = dict(app.exception_handlers)

    def wrap(exc_type: Any) -> None:
        fallback = defaults[exc_type]

        async def handler(request: Request, exc: Any) -> Response:
            if not is_openai_path(request.url.path):
                return await fallback(request, exc)  # type: ignore[no-any-return]
            status, code, message, param = 500, "internal_error", "internal error", None
            headers: dict[str, str] = {}
            if isinstance(exc, WorkbenchError):
                status, code, message = exc.status, exc.code, exc.detail
                param = exc.extra.get("param") or exc.extra.get("field")
                headers = exc.headers
            elif isinstance(exc, RequestValidationError):
                err = exc.errors()[0]
                status, code = 400, "invalid_request"
                param = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or None
                message = f"{param}: {err.get('msg')}" if param else str(err.get("msg"))
            elif isinstance(exc, StarletteHTTPException):
                status, code = exc.status_code, "not_found" if exc.status_code == 404 \
                    else "http_error"
                message = str(exc.detail) if exc.status_code != 404 else \
                    f"no such route: {request.url.path}"
            return JSONResponse(openai_error_body(status, code, message, param=param),
                                status_code=status, headers=headers)

        app.add_exception_handler(exc_type, handler)

    for exc_type in (WorkbenchError, RequestValidationError, StarletteHTTPException):
        wrap(exc_type)
