"""Builds the user service app."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from services.user.api import ROUTERS
from services.user.events import Events
from services.user.keys import Keyring
from services.user.models import EVENT_TABLES
from services.user.service import UserService
from services.user.settings import UserSettings
from workbench.app import create_app as create_service_app
from workbench.db import Database
from workbench.events.bus import EventBus
from workbench.events.factory import bus_from_settings
from workbench.events.outbox import OutboxRelay
from workbench.identity.tokens import TokenVerifier

NAME = "user"
MIGRATIONS = Path(__file__).parent / "migrations"


def create_app(settings: UserSettings | None = None, *, bus: EventBus | None = None) -> FastAPI:
    """`bus` is passed in embedded mode, where every service shares one in-process bus."""
    settings = settings or UserSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database.for_service(NAME, settings, settings)
        own_bus = bus is None
        event_bus = bus or bus_from_settings(settings, settings, name=NAME)
        if own_bus:
            await event_bus.start()
        keyring = Keyring(db, settings.secret_key.get_secret_value().encode(),
                          access_ttl_s=max(settings.access_ttl_s, settings.key_exchange_ttl_s),
                          reload_interval_s=settings.keyring_reload_interval_s)
        await keyring.load()
        refresher = asyncio.create_task(keyring.run_refresher(), name="keyring-refresh")
        relay = OutboxRelay(db, event_bus, EVENT_TABLES,
                            batch_size=settings.outbox_batch_size,
                            poll_interval_s=settings.outbox_poll_interval_s)
        relay.start()
        app.state.db = db
        app.state.bus = event_bus
        app.state.relay = relay
        app.state.user_service = UserService(settings, keyring, Events())
        app.state.verifier = TokenVerifier(
            keyring.jwks, issuer=settings.jwt_issuer, audience=settings.jwt_audience,
            leeway_s=settings.jwt_leeway_s, min_refresh_interval_s=0,
        )
        app.state.readiness.update({"database": db.ping, "bus": event_bus.ping})
        try:
            yield
        finally:
            refresher.cancel()
            await relay.stop()
            if own_bus:
                await event_bus.close()
            await db.dispose()

    return create_service_app(
        service=NAME,
        settings=settings,
        routers=ROUTERS,
        lifespan=lifespan,
        title="xai-workbench user service",
        description="Accounts, sign-in, organizations, members, projects, API keys and quotas.",
    )
