"""Builds the data service app: the API, the object store (encrypted per org where datasets are
sensitive), the user-service client, and the sweep that expires uploads, purges deleted datasets
and finishes interrupted re-encryptions."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from fastapi import FastAPI

from services.data.annotations import Annotations
from services.data.api import internal, router
from services.data.blobs import Blobs
from services.data.crypto import derive_kek
from services.data.events import Events
from services.data.models import EVENT_TABLES
from services.data.service import DataService
from services.data.settings import DataSettings
from services.data.transforms import Transforms
from services.data.uploads import Uploads
from services.data.upstream import UserDirectory
from workbench.app import create_app as create_service_app
from workbench.client import ServiceClient
from workbench.db import Database
from workbench.events.bus import EventBus
from workbench.events.factory import bus_from_settings
from workbench.events.outbox import OutboxRelay
from workbench.identity.tokens import JwksSource, verifier_for_service
from workbench.internal import INTERNAL_TOKEN_HEADER
from workbench.storage import object_store_from_settings

NAME = "data"
MIGRATIONS = Path(__file__).parent / "migrations"
# Bodies of these routes are files (the gateway has the same list in gateway.routes).
UPLOAD_PATHS = (r"^/api/v1/datasets/[^/]+/versions/?$",
                r"^/api/v1/datasets/[^/]+/uploads/[^/]+/?$")
log = logging.getLogger("services.data")


def create_app(settings: DataSettings | None = None, *, bus: EventBus | None = None,
               jwks: JwksSource | None = None,
               user_transport: httpx.AsyncBaseTransport | None = None) -> FastAPI:
    """`bus`, `jwks` and `user_transport` (the user service in process) are passed in embedded
    mode."""
    settings = settings or DataSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database.for_service(NAME, settings, settings)
        own_bus = bus is None
        event_bus = bus or bus_from_settings(settings, settings, name=NAME)
        if own_bus:
            await event_bus.start()
        store = object_store_from_settings(settings, settings)
        user_client = ServiceClient(
            "user", settings.user_url, transport=user_transport,
            default_headers={INTERNAL_TOKEN_HEADER: settings.internal_token.get_secret_value()})
        blobs = Blobs(store, db, derive_kek(settings.secret_key.get_secret_value()))
        service = DataService(settings, db, blobs, UserDirectory(user_client), Events())
        transforms = Transforms(service)
        uploads = Uploads(service)
        relay = OutboxRelay(db, event_bus, EVENT_TABLES, batch_size=settings.outbox_batch_size,
                            poll_interval_s=settings.outbox_poll_interval_s)
        relay.start()
        sweeper = asyncio.create_task(_sweep_loop(service, uploads), name="data-sweep")
        app.state.db = db
        app.state.data_service = service
        app.state.data_uploads = uploads
        app.state.data_transforms = transforms
        app.state.data_annotations = Annotations(service, transforms)
        app.state.verifier = verifier_for_service(settings, jwks)
        app.state.readiness.update({"database": db.ping, "bus": event_bus.ping,
                                    "object_store": store.ping})
        try:
            yield
        finally:
            sweeper.cancel()
            await relay.stop()
            if own_bus:
                await event_bus.close()
            await user_client.aclose()
            await store.close()
            await db.dispose()

    limit = settings.data_max_upload_bytes + (1 << 20)  # multipart framing around the file
    return create_service_app(
        service=NAME, settings=settings, routers=[router, internal], lifespan=lifespan,
        body_limit_overrides={pattern: limit for pattern in UPLOAD_PATHS},
        title="xai-workbench data service",
        description="Datasets in projects: streamed and resumable uploads into object storage, "
                    "format checks, schema, stats and preview, immutable versions with "
                    "checksums, lineage, PII scan and masking, encryption of sensitive data, "
                    "labelling tasks.",
    )


async def _sweep_loop(service: DataService, uploads: Uploads) -> None:
    while True:
        await asyncio.sleep(service.settings.data_sweep_interval_s)
        try:
            await sweep(service, uploads)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("data sweep failed: %s", exc)


async def sweep(service: DataService, uploads: Uploads) -> None:
    """One pass: expire unfinished uploads, purge datasets past their purge time, finish
    re-encrypting sensitive datasets."""
    expired = await uploads.expire()
    if expired:
        log.info("expired %d unfinished uploads", expired)
    for org_id, dataset_id in await service.due_purges():
        await service.purge_dataset(org_id, dataset_id, actor="system")
        log.info("purged dataset %s of org %s", dataset_id, org_id)
    for org_id, dataset_id in await service.datasets_to_encrypt():
        n = await service.encrypt_existing_versions(org_id, dataset_id)
        log.info("encrypted %d versions of sensitive dataset %s", n, dataset_id)
