"""The user service in distributed mode against its own NATS JetStream server: events reach a
durable subscriber, survive a NATS outage in the outbox, and are stored once per event id."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from fastapi import FastAPI
from nats.aio.client import Client as NatsClient
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from sqlalchemy import select

from services.user import app as user_app_module
from services.user.models import EVENT_TABLES
from services.user.settings import UserSettings
from workbench.db import Database
from workbench.events.contracts import validate_event_data
from workbench.events.envelope import EventEnvelope
from workbench.events.nats_bus import JetStreamBus
from workbench.migrations import upgrade
from workbench.testing import (
    NatsServer,
    create_pg_database,
    drop_pg_database,
    unique,
)

SECRET = "test-secret-key-0123456789abcdef"
INTERNAL = "test-internal-token-0123456789ab"
STREAM = "WB_EVENTS"
REGISTERED = "wb.user.user.registered"


async def eventually(cond: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.1)


class Subscriber:
    """A durable pull consumer on WB_EVENTS (`wb.user.>`) with raw nats-py, as another service
    would run it: acks after handling, dedupes by envelope id, checks every payload's contract."""

    def __init__(self, url: str, durable: str) -> None:
        self.url, self.durable = url, durable
        self.events: dict[str, EventEnvelope] = {}  # by envelope id
        self.deliveries = 0
        self.violations: list[str] = []
        self.nc: NatsClient | None = None
        self.js: JetStreamContext | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.nc = await nats.connect(self.url, allow_reconnect=True, max_reconnect_attempts=-1,
                                     reconnect_time_wait=0.2, connect_timeout=2)
        self.js = self.nc.jetstream()
        sub = await self._subscribe()
        self._task = asyncio.create_task(self._run(sub))

    async def _subscribe(self) -> JetStreamContext.PullSubscription:
        assert self.js is not None
        return await self.js.pull_subscribe("wb.user.>", durable=self.durable, stream=STREAM)

    async def _run(self, sub: JetStreamContext.PullSubscription | None) -> None:
        while True:
            try:
                if sub is None:
                    sub = await self._subscribe()
                msgs = await sub.fetch(50, timeout=0.5)
            except (NatsTimeoutError, TimeoutError):
                continue
            except asyncio.CancelledError:
                raise
            except Exception:  # NATS is down: try again, recreating the subscription
                sub = None
                await asyncio.sleep(0.2)
                continue
            for msg in msgs:
                self.deliveries += 1
                envelope = EventEnvelope.from_bytes(msg.data)
                try:
                    validate_event_data(envelope.type, envelope.data)
                except Exception as exc:
                    self.violations.append(f"{envelope.id} {envelope.type}: {exc}")
                self.events.setdefault(envelope.id, envelope)
                await msg.ack()

    def registered_for(self, user_id: str) -> list[EventEnvelope]:
        return [e for e in self.events.values()
                if e.type == REGISTERED and e.data.get("user_id") == user_id]

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self.nc is not None:
            try:
                await self.nc.close()
            except ConnectionError:
                pass


class Running:
    def __init__(self, nats_server: NatsServer, app: FastAPI, client: httpx.AsyncClient,
                 subscriber: Subscriber) -> None:
        self.nats, self.app, self.client, self.subscriber = nats_server, app, client, subscriber

    async def register(self) -> str:
        name = unique("user")
        r = await self.client.post("/api/v1/auth/register", json={
            "email": f"{name}@example.com", "username": name,
            "password": "correct horse battery staple"})
        assert r.status_code == 201, r.text
        user_id: str = r.json()["user"]["id"]
        return user_id

    async def outbox_rows(self, user_id: str) -> list[dict[str, Any]]:
        """The outbox rows of `user_id`'s registration."""
        db: Database = self.app.state.db
        t = EVENT_TABLES.outbox
        async with db.transaction() as s:
            rows = (await s.execute(select(t).where(t.c.type == REGISTERED))).mappings().all()
        return [dict(r) for r in rows
                if EventEnvelope.from_bytes(bytes(r["payload"])).data["user_id"] == user_id]

    async def pending_rows(self) -> list[dict[str, Any]]:
        db: Database = self.app.state.db
        t = EVENT_TABLES.outbox
        async with db.transaction() as s:
            rows = (await s.execute(select(t).where(t.c.published_at.is_(None))
                                    .order_by(t.c.seq))).mappings().all()
        return [dict(r) for r in rows]

    async def stream_copies(self, event_id: str) -> int:
        """How many messages in the stream carry `event_id`."""
        js = self.subscriber.js
        assert js is not None
        state = (await js.stream_info(STREAM)).state
        count = 0
        for seq in range(state.first_seq, state.last_seq + 1):
            try:
                msg = await js.get_msg(STREAM, seq=seq)
            except NotFoundError:
                continue
            if msg.data and EventEnvelope.from_bytes(msg.data).id == event_id:
                count += 1
        return count


@pytest.fixture(scope="module")
async def own_nats(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[NatsServer]:
    server = NatsServer(tmp_path_factory.mktemp("own-nats")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
async def running(own_nats: NatsServer) -> AsyncIterator[Running]:
    name, url = await create_pg_database()
    settings = UserSettings(mode="distributed", database_url=url, nats_url=own_nats.url,
                            secret_key=SECRET, internal_token=INTERNAL,
                            outbox_poll_interval_s=0.2, access_log=False,
                            data_dir=Path(str(own_nats.workdir)) / "data")
    db = Database.for_service("user", settings, settings)
    await upgrade(db, user_app_module.MIGRATIONS, "user")
    await db.dispose()
    app = user_app_module.create_app(settings)
    try:
        async with app.router.lifespan_context(app):
            subscriber = Subscriber(own_nats.url, durable=f"test-{uuid.uuid4().hex[:8]}")
            await subscriber.start()
            try:
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app),
                                             base_url="http://user", timeout=30) as client:
                    yield Running(own_nats, app, client, subscriber)
            finally:
                await subscriber.stop()
    finally:
        await drop_pg_database(name)


async def test_registration_reaches_durable_subscriber_exactly_once(running: Running) -> None:
    user_id = await running.register()

    async def arrived() -> bool:
        return bool(running.subscriber.registered_for(user_id))

    await eventually(arrived, 10, "the registered event reaches the subscriber")
    await asyncio.sleep(0.5)  # room for a duplicate to show up
    [event] = running.subscriber.registered_for(user_id)
    assert event.source == "wb/user" and event.subject == user_id
    assert event.actor == f"user:{user_id}" and event.org_id == event.data["org_id"]
    assert await running.stream_copies(event.id) == 1
    assert running.subscriber.violations == []


async def test_registration_during_nats_outage_waits_in_outbox_and_arrives_once_after(
        running: Running) -> None:
    bus = running.app.state.bus
    running.nats.stop()
    try:
        async def bus_down() -> bool:
            try:
                await bus.ping()
            except Exception:
                return True
            return False

        await eventually(bus_down, 10, "the service notices NATS is down")

        user_id = await running.register()  # the change succeeds while the bus is down
        [row] = await running.outbox_rows(user_id)
        assert row["published_at"] is None
        event_id = row["event_id"]

        async def relay_tried() -> bool:
            # The relay publishes in order and stops at the first failure: the oldest pending
            # row (this registration's org.created) carries the attempts.
            head = (await running.pending_rows())[0]
            return bool(head["attempts"] >= 1 and head["last_error"])

        await eventually(relay_tried, 5, "the relay tries to publish and keeps the rows")
        [row] = await running.outbox_rows(user_id)
        assert row["published_at"] is None
        assert running.subscriber.registered_for(user_id) == []
    finally:
        running.nats.start()  # same port, same store

    async def arrived() -> bool:
        return bool(running.subscriber.registered_for(user_id))

    await eventually(arrived, 15, "the held event arrives after NATS is back")
    await asyncio.sleep(0.5)
    [event] = running.subscriber.registered_for(user_id)
    assert event.id == event_id
    [row] = await running.outbox_rows(user_id)
    assert row["published_at"] is not None
    assert await running.pending_rows() == []
    assert await running.stream_copies(event_id) == 1
    assert running.subscriber.violations == []


async def test_same_envelope_published_twice_is_stored_once(running: Running) -> None:
    bus = JetStreamBus(running.nats.url, name="test-publisher")
    await asyncio.wait_for(bus.start(), 10)
    js = running.subscriber.js
    assert js is not None
    user_id = uuid.uuid4().hex
    envelope = EventEnvelope(type=REGISTERED, source="wb/user", subject=user_id, data={
        "user_id": user_id, "email": "dup@example.com", "username": "dup",
        "org_id": uuid.uuid4().hex})
    try:
        before = (await js.stream_info(STREAM)).state.messages
        await bus.publish(envelope)
        await bus.publish(envelope)
        await bus.publish(EventEnvelope.from_bytes(envelope.to_bytes()))
        after = (await js.stream_info(STREAM)).state.messages
    finally:
        await bus.close()
    assert after == before + 1
    assert await running.stream_copies(envelope.id) == 1

    async def arrived() -> bool:
        return bool(running.subscriber.registered_for(user_id))

    await eventually(arrived, 10, "the published event reaches the subscriber")
    assert [e.id for e in running.subscriber.registered_for(user_id)] == [envelope.id]
    assert running.subscriber.violations == []


async def test_bus_starts_without_nats_and_connects_when_it_appears(
    tmp_path: Path,
) -> None:
    # A service must come up while NATS is down (the outbox holds its events); the bus keeps
    # connecting in the background and works as soon as NATS is there.
    server = NatsServer(tmp_path / "late")
    bus = JetStreamBus(server.url, name="test-late", first_connect_timeout_s=2)
    try:
        await asyncio.wait_for(bus.start(), 6)
        with pytest.raises(ConnectionError):
            await bus.ping()
        with pytest.raises(ConnectionError):
            await bus.publish(EventEnvelope(type="wb.user.org.deleted", source="test",
                                            data={"org_id": "x"}))
        server.start()
        deadline = asyncio.get_running_loop().time() + 15
        while True:
            try:
                await bus.ping()
                break
            except ConnectionError:
                assert asyncio.get_running_loop().time() < deadline, "never connected"
                await asyncio.sleep(0.2)
        await bus.publish(EventEnvelope(type="wb.user.org.deleted", source="test",
                                        data={"org_id": "x"}))
    finally:
        await bus.close()
        server.stop()
