"""Builds the kb service app: the API, the vector store (milvus-lite file or Milvus server), the
object store for documents, clients of the user, inference and data services, the ingestion
loop and the scheduled refresh."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from fastapi import FastAPI

from services.kb.api import router
from services.kb.events import Events
from services.kb.ingest import Ingestor
from services.kb.models import EVENT_TABLES
from services.kb.rag import Rag
from services.kb.refresh import Refresher
from services.kb.service import KbService
from services.kb.settings import KbSettings
from services.kb.upstream import Upstream
from services.kb.vectors import VectorStore
from workbench.app import create_app as create_service_app
from workbench.client import ServiceClient
from workbench.db import Database
from workbench.events.bus import EventBus
from workbench.events.factory import bus_from_settings
from workbench.events.outbox import OutboxRelay
from workbench.identity.tokens import JwksSource, verifier_for_service
from workbench.internal import INTERNAL_TOKEN_HEADER
from workbench.storage import object_store_from_settings

NAME = "kb"
MIGRATIONS = Path(__file__).parent / "migrations"
# Bodies of these routes are files (the gateway has the same list in gateway.routes).
UPLOAD_PATHS = (r"^/api/v1/kb/[^/]+/documents/?$",)


def create_app(settings: KbSettings | None = None, *, bus: EventBus | None = None,
               jwks: JwksSource | None = None,
               user_transport: httpx.AsyncBaseTransport | None = None,
               transports: Mapping[str, httpx.AsyncBaseTransport] | None = None) -> FastAPI:
    """`bus`, `jwks` and the transports (the user, inference and data services in process) are
    passed in embedded mode."""
    settings = settings or KbSettings()
    transports = dict(transports or {})
    if user_transport is not None:
        transports.setdefault("user", user_transport)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database.for_service(NAME, settings, settings)
        own_bus = bus is None
        event_bus = bus or bus_from_settings(settings, settings, name=NAME)
        if own_bus:
            await event_bus.start()
        store = object_store_from_settings(settings, settings)
        uri = settings.kb_milvus_uri or str(settings.data_dir / "kb" / "milvus.db")
        if "://" not in uri:
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
        vectors = VectorStore(uri, settings.kb_milvus_token)
        await vectors.start()
        internal = {INTERNAL_TOKEN_HEADER: settings.internal_token.get_secret_value()}
        user_client = ServiceClient("user", settings.user_url, transport=transports.get("user"),
                                    default_headers=internal)
        data_client = ServiceClient("data", settings.data_url, transport=transports.get("data"),
                                    default_headers=internal)
        inference = httpx.AsyncClient(
            base_url=settings.inference_url, transport=transports.get("inference"),
            headers=internal, trust_env=False,
            timeout=httpx.Timeout(600.0, connect=5.0),
            limits=httpx.Limits(max_connections=64))
        service = KbService(settings, db, store, vectors,
                            Upstream(user_client, inference, data_client), Events())
        ingestor = Ingestor(service)
        refresher = Refresher(service)
        relay = OutboxRelay(db, event_bus, EVENT_TABLES, batch_size=settings.outbox_batch_size,
                            poll_interval_s=settings.outbox_poll_interval_s)
        relay.start()
        tasks = [asyncio.create_task(ingestor.run(), name="kb-ingest"),
                 asyncio.create_task(refresher.run(), name="kb-refresh")]
        app.state.db = db
        app.state.kb_service = service
        app.state.kb_ingestor = ingestor
        app.state.kb_refresher = refresher
        app.state.kb_rag = Rag(service)
        app.state.verifier = verifier_for_service(settings, jwks)
        app.state.readiness.update({"database": db.ping, "bus": event_bus.ping,
                                    "object_store": store.ping, "vectors": vectors.ping})
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            await ingestor.stop()
            await relay.stop()
            if own_bus:
                await event_bus.close()
            await inference.aclose()
            await user_client.aclose()
            await data_client.aclose()
            await vectors.close()
            await store.close()
            await db.dispose()

    limit = settings.kb_max_document_bytes + (1 << 20)  # multipart framing around the file
    return create_service_app(
        service=NAME, settings=settings, routers=[router], lifespan=lifespan,
        body_limit_overrides={pattern: limit for pattern in UPLOAD_PATHS},
        title="xai-workbench kb service",
        description="Knowledge bases: documents (txt, md, html, pdf, docx, csv, jsonl) parsed "
                    "with their headings and pages, chunked, embedded by the inference service "
                    "and indexed in Milvus and a BM25 keyword index; vector, keyword and hybrid "
                    "retrieval with metadata filters; answers with numbered citations.")
