"""Builds the inference service app: the management API, the OpenAI-compatible API (with
OpenAI-shaped errors), the supervisor of the replicas, metering and metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from fastapi import FastAPI

from services.inference.api import router
from services.inference.events import Events
from services.inference.metrics import Metrics
from services.inference.models import EVENT_TABLES
from services.inference.openai_api import internal_router, replica_session
from services.inference.openai_api import router as openai_router
from services.inference.runtimes.base import Runtime
from services.inference.runtimes.local import LocalRuntime
from services.inference.runtimes.rayserve import RayServeRuntime
from services.inference.runtimes.remote import OpenAIRuntime, VllmRuntime
from services.inference.service import InferenceService
from services.inference.settings import InferenceSettings
from services.inference.supervisor import Supervisor
from services.inference.usage import Metering
from workbench.app import create_app as create_service_app
from workbench.client import ServiceClient
from workbench.db import Database
from workbench.events.bus import EventBus
from workbench.events.factory import bus_from_settings
from workbench.events.outbox import OutboxRelay
from workbench.identity.tokens import JwksSource, verifier_for_service
from workbench.internal import INTERNAL_TOKEN_HEADER

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
        # Ray itself is imported only by its driver processes: without ray installed a rayserve
        # deployment fails, saying so.
        rayserve = RayServeRuntime.from_settings(settings)
        runtimes["rayserve"] = rayserve
        try:  # tritonclient is only needed by the triton runtime
            from services.inference.runtimes.triton import TritonRuntime
        except ImportError:
            pass  # a triton deployment fails: "runtime 'triton' is not available here"
        else:
            runtimes["triton"] = TritonRuntime(
                logs, settings.data_dir / "inference" / "triton",
                server=settings.inference_triton_server,
                backend_directory=settings.inference_triton_backend_directory,
                execution_env=settings.inference_triton_execution_env,
                default_n_ctx=settings.inference_default_n_ctx,
                threads=settings.inference_worker_threads,
                request_timeout=settings.inference_request_timeout_s)
        metrics = Metrics()
        cluster = None
        if settings.inference_kubernetes:  # kubernetes-asyncio is only needed then
            from services.inference.kubernetes import PLACED_RUNTIMES, KubernetesCluster

            cluster = await KubernetesCluster.connect(settings)
            runtimes.update({n: cluster.place(runtimes[n]) for n in PLACED_RUNTIMES})
        supervisor = Supervisor(settings, runtimes, on_status, metrics)
        service = InferenceService(settings, db, supervisor, events)
        user_client = ServiceClient(
            "user", settings.user_url, transport=user_transport,
            default_headers={INTERNAL_TOKEN_HEADER: settings.internal_token.get_secret_value()})
        relay = OutboxRelay(db, event_bus, EVENT_TABLES, batch_size=settings.outbox_batch_size,
                            poll_interval_s=settings.outbox_poll_interval_s)
        relay.start()
        replica_http = replica_session(settings.inference_request_timeout_s)
        app.state.db = db
        app.state.inference_service = service
        app.state.supervisor = supervisor
        app.state.metrics = metrics
        metering = Metering(db, events, metrics, user_client,
                            cache_s=settings.inference_quota_cache_s,
                            flush_s=settings.inference_usage_flush_s)
        metering.start()
        app.state.metering = metering
        app.state.replica_http = replica_http
        app.state.verifier = verifier_for_service(settings, jwks)
        app.state.readiness.update({"database": db.ping, "bus": event_bus.ping})
        if settings.inference_resume_deployments:
            await service.resume()
        try:
            yield
        finally:
            await rayserve.close()  # before the supervisor: its head and apps go at once
            if cluster is not None:
                cluster.detach()  # the model workloads stay; the next start adopts them
            await supervisor.close()
            if cluster is not None:
                await cluster.close()
            await replica_http.close()
            await metering.close()  # the last usage events, before the relay's last round
            await relay.stop()
            if own_bus:
                await event_bus.close()
            await user_client.aclose()
            await db.dispose()

    return create_service_app(
        service=NAME, settings=settings, routers=[router, openai_router, internal_router],
        lifespan=lifespan,
        title="xai-workbench inference service",
        description="Serves models: a catalog of built-in and external models, deployments on "
                    "local, OpenAI-compatible and vLLM runtimes with health checks, an "
                    "OpenAI-compatible API, traffic splitting, metrics, metering and content "
                    "safety.")

