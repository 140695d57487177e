"""Builds the audit service app: the API, the consumer of every platform event, and the
retention loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from services.audit.api import router
from services.audit.events import CONSUMER, SUBJECT, Events
from services.audit.models import EVENT_TABLES
from services.audit.service import AuditService
from services.audit.settings import AuditSettings
from workbench.app import create_app as create_service_app
from workbench.db import Database
from workbench.events.bus import ConsumerOptions, EventBus
from workbench.events.envelope import EventEnvelope
from workbench.events.factory import bus_from_settings
from workbench.events.outbox import OutboxRelay
from workbench.identity.tokens import JwksSource, verifier_for_service
from workbench.storage import object_store_from_settings

NAME = "audit"
MIGRATIONS = Path(__file__).parent / "migrations"
log = logging.getLogger("services.audit")


def create_app(settings: AuditSettings | None = None, *, bus: EventBus | None = None,
               jwks: JwksSource | None = None) -> FastAPI:
    """`bus` and `jwks` (a JWKS source) are passed in embedded mode."""
    settings = settings or AuditSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database.for_service(NAME, settings, settings)
        own_bus = bus is None
        event_bus = bus or bus_from_settings(settings, settings, name=NAME)
        if own_bus:
            await event_bus.start()
        store = object_store_from_settings(settings, settings)
        service = AuditService(db, store, Events())
        relay = OutboxRelay(db, event_bus, EVENT_TABLES, batch_size=settings.outbox_batch_size,
                            poll_interval_s=settings.outbox_poll_interval_s)
        relay.start()

        async def record(events: list[EventEnvelope]) -> None:
            async with db.transaction() as s:
                await service.ingest(s, events)

        consumer = await event_bus.subscribe_batch(
            CONSUMER, SUBJECT, record, ConsumerOptions(batch=settings.audit_batch_size))
        retention = asyncio.create_task(_retention_loop(service, settings), name="retention")
        app.state.db = db
        app.state.audit_service = service
        app.state.verifier = verifier_for_service(settings, jwks)
        app.state.readiness.update({"database": db.ping, "bus": event_bus.ping,
                                    "object_store": store.ping})
        try:
            yield
        finally:
            retention.cancel()
            await consumer.stop()
            await relay.stop()
            if own_bus:
                await event_bus.close()
            await store.close()
            await db.dispose()

    return create_service_app(
        service=NAME, settings=settings, routers=[router], lifespan=lifespan,
        title="xai-workbench audit service",
        description="Every platform event and gateway access on record: hash-chained per "
                    "organization, searchable, exportable, with retention and compliance "
                    "summaries.",
    )


async def _retention_loop(service: AuditService, settings: AuditSettings) -> None:
    while True:
        await asyncio.sleep(settings.audit_retention_interval_s)
        try:
            for policy in await service.due_policies():
                archive = await service.apply_retention(policy.org_id, policy.days)
                if archive is not None:
                    log.info("retention archived %d records of org %s to %s",
                             archive.records, policy.org_id, archive.object_key)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("retention run failed: %s", exc)
