"""The audit service's consumer under faults, in distributed mode against its own NATS JetStream
server, a fresh PostgreSQL database and a real S3 (SeaweedFS): every platform event becomes
exactly one record in its organization's hash chain (seq 1..N, verified from the genesis hash)
(a) when the audit service was down while the events were published, (b) when NATS restarts
while an outbox relay publishes, (c) when the same event arrives twice, in one batch or in two,
through the bus or straight into `AuditService.ingest`, and (d) when the audit service is
stopped in the middle of a batch and started again; and an event that cannot be recorded does
not hold back the others.

The audit app runs in-process (`app.router.lifespan_context`); events are published with the
shared bus (`JetStreamBus.publish`) or, for (b), through a real outbox and `OutboxRelay`; what was
recorded is read straight from the database. (d) runs against the service's own consumer (60 s
ack_wait): a stopped consumer hands back what it could not finish, so nothing waits that long."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import pytest
from fastapi import FastAPI
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError
from sqlalchemy import func, select

from services.audit import app as audit_app
from services.audit.events import CONSUMER, Events
from services.audit.models import AuditRecord, ChainHead
from services.audit.service import AuditService
from services.audit.settings import AuditSettings
from workbench.db import Database, new_metadata
from workbench.events.envelope import EventEnvelope
from workbench.events.nats_bus import JetStreamBus
from workbench.events.outbox import MAX_BACKOFF_S, Outbox, OutboxRelay, event_tables
from workbench.migrations import upgrade
from workbench.storage import LocalObjectStore
from workbench.testing import (
    NatsServer,
    SeaweedServer,
    create_pg_database,
    drop_pg_database,
)

pytestmark = [pytest.mark.timeout(300)]

SECRET = "test-secret-key-0123456789abcdef"
INTERNAL = "test-internal-token-0123456789ab"
STREAM = "WB_EVENTS"
PROJECT_CREATED = "wb.user.project.created"
# The audit consumer's ack_wait (workbench.events.nats_bus): a delivery that was never acked
# (the consumer stopped or crashed mid-batch) comes back after this long.
ACK_WAIT_S = 60.0


# ---- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def pg_url() -> AsyncIterator[str]:
    """A fresh database with the audit schema migrated."""
    name, url = await create_pg_database("wb_audit_faults")
    try:
        settings = AuditSettings(mode="distributed", database_url=url, secret_key=SECRET,
                                 internal_token=INTERNAL)
        db = Database.for_service("audit", settings, settings)
        try:
            await upgrade(db, audit_app.MIGRATIONS, "audit")
        finally:
            await db.dispose()
        yield url
    finally:
        await drop_pg_database(name)


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats").start()
    yield server
    server.stop()


@pytest.fixture
def settings(pg_url: str, own_nats: NatsServer, s3_server: SeaweedServer,
             tmp_path: Path) -> AuditSettings:
    s3 = s3_server.env(bucket="wb-audit-faults")
    return AuditSettings(
        mode="distributed", database_url=pg_url, nats_url=own_nats.url,
        secret_key=SECRET, internal_token=INTERNAL,
        jwks_url="http://127.0.0.1:9/unused/jwks.json",  # no request reaches the API here
        s3_endpoint=s3["WB_S3_ENDPOINT"], s3_access_key=s3["WB_S3_ACCESS_KEY"],
        s3_secret_key=s3["WB_S3_SECRET_KEY"], s3_bucket=s3["WB_S3_BUCKET"],
        access_log=False, outbox_poll_interval_s=0.2,
        data_dir=tmp_path / "data",
    )


@pytest.fixture
async def records(settings: AuditSettings, tmp_path: Path) -> AsyncIterator[Records]:
    db = Database.for_service("audit", settings, settings)
    try:
        yield Records(db, AuditService(db, LocalObjectStore(tmp_path / "objects"), Events()))
    finally:
        await db.dispose()


@pytest.fixture
async def publisher(own_nats: NatsServer) -> AsyncIterator[JetStreamBus]:
    bus = JetStreamBus(own_nats.url, name="test-publisher")
    await asyncio.wait_for(bus.start(), 10)
    try:
        yield bus
    finally:
        await bus.close()


# ---- helpers ------------------------------------------------------------------------------------


@asynccontextmanager
async def audit_running(settings: AuditSettings) -> AsyncIterator[FastAPI]:
    """The audit service in this process, as `wb serve audit` runs it (lifespan included)."""
    app = audit_app.create_app(settings)
    async with app.router.lifespan_context(app):
        yield app


def new_org() -> str:
    return str(uuid.uuid4())


def project_events(org: str, n: int, *, tag: str = "p") -> list[EventEnvelope]:
    owner = str(uuid.uuid4())
    out = []
    for i in range(n):
        project = str(uuid.uuid4())
        out.append(EventEnvelope(
            type=PROJECT_CREATED, source="wb/user", subject=project, org_id=org,
            actor=f"user:{owner}",
            data={"project_id": project, "name": f"{tag} {i}", "slug": f"{tag}-{i}",
                  "owner_id": owner}))
    return out


async def publish_all(bus: JetStreamBus, events: Sequence[EventEnvelope],
                      concurrency: int = 64) -> None:
    sem = asyncio.Semaphore(concurrency)

    async def one(e: EventEnvelope) -> None:
        async with sem:
            await bus.publish(e)

    await asyncio.gather(*(one(e) for e in events))


async def eventually(cond: Callable[[], Awaitable[bool]], timeout: float, what: str,
                     interval: float = 0.1) -> float:
    """Waits for `cond`; returns the seconds it took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not await cond():
        if loop.time() - start > timeout:
            raise AssertionError(f"not within {timeout:.0f}s: {what}")
        await asyncio.sleep(interval)
    return loop.time() - start


class Records:
    """Reads the audit database directly."""

    def __init__(self, db: Database, service: AuditService) -> None:
        self.db, self.service = db, service

    async def counts(self, event_ids: Sequence[str]) -> dict[str, int]:
        """How many records carry each event id (absent: none)."""
        out: dict[str, int] = {}
        ids = list(event_ids)
        async with self.db.transaction() as s:
            for i in range(0, len(ids), 2000):
                rows = (await s.execute(
                    select(AuditRecord.event_id, func.count())
                    .where(AuditRecord.event_id.in_(ids[i:i + 2000]))
                    .group_by(AuditRecord.event_id))).all()
                out.update({str(k): int(n) for k, n in rows})
        return out

    async def recorded(self, events: Sequence[EventEnvelope]) -> int:
        return len(await self.counts([e.id for e in events]))

    async def wait_for(self, events: Sequence[EventEnvelope], timeout: float,
                       what: str = "") -> float:
        async def done() -> bool:
            return await self.recorded(events) >= len(events)

        return await eventually(done, timeout,
                                what or f"all {len(events)} events recorded", interval=0.2)

    async def assert_exactly_once(self, org: str, events: Sequence[EventEnvelope]) -> None:
        """Every event has one record, the org's chain holds exactly these events, numbered
        1..N without gaps, and verifies from the genesis hash."""
        ids = [e.id for e in events]
        assert len(set(ids)) == len(ids)
        counts = await self.counts(ids)
        missing = [i for i in ids if i not in counts]
        doubled = {i: n for i, n in counts.items() if n != 1}
        assert not missing, f"{len(missing)} of {len(ids)} events were never recorded"
        assert not doubled, f"events recorded more than once: {doubled}"
        async with self.db.transaction() as s:
            rows = (await s.execute(
                select(AuditRecord.seq, AuditRecord.event_id)
                .where(AuditRecord.chain == org).order_by(AuditRecord.seq))).all()
            head = (await s.execute(select(ChainHead).where(ChainHead.chain == org))
                    ).scalar_one()
            verdict = await self.service.verify(s, org)
        assert [seq for seq, _ in rows] == list(range(1, len(ids) + 1))
        assert sorted(str(e) for _, e in rows) == sorted(ids)
        assert head.last_seq == len(ids)
        assert verdict == {"ok": True, "checked": len(ids), "first_broken": None,
                           "last_seq": len(ids), "anchor_seq": 0}, verdict


def at_least(records: Records, events: list[EventEnvelope],
             n: int) -> Callable[[], Awaitable[bool]]:
    """A condition: `n` of `events` (a list that may still grow) are recorded."""
    async def cond() -> bool:
        return await records.recorded(list(events)) >= n

    return cond


async def consumer_state(url: str) -> tuple[int, int]:
    """(num_pending, num_ack_pending) of the audit consumer."""
    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
    try:
        info = await nc.jetstream().consumer_info(STREAM, CONSUMER)
        return int(info.num_pending or 0), int(info.num_ack_pending or 0)
    finally:
        await nc.close()


async def wait_consumer_settled(url: str, timeout: float = 15.0) -> None:
    """Nothing left to deliver and every delivery acked (the acks reached the server)."""
    async def settled() -> bool:
        try:
            return await consumer_state(url) == (0, 0)
        except NotFoundError:
            return False

    await eventually(settled, timeout, "the audit consumer has nothing pending or unacked")


# ---- (a) the audit service is down while events are published -----------------------------------


async def test_events_published_while_audit_is_down_are_recorded_once_when_it_is_back(
    settings: AuditSettings, records: Records, publisher: JetStreamBus,
    own_nats: NatsServer,
) -> None:
    org = new_org()
    before = project_events(org, 5, tag="before")
    async with audit_running(settings):
        await publish_all(publisher, before)
        await records.wait_for(before, 15, "the audit consumer runs")
        await wait_consumer_settled(own_nats.url)
    # Down: its durable consumer stays on the stream, so the events wait there.
    while_down = project_events(org, 1000, tag="down")
    await publish_all(publisher, while_down)
    await asyncio.sleep(0.5)
    assert await records.recorded(while_down) == 0
    assert (await consumer_state(own_nats.url))[0] == 1000

    async with audit_running(settings):
        await records.wait_for(while_down, 30)
        await wait_consumer_settled(own_nats.url)
        await asyncio.sleep(0.5)  # room for a redelivery to show up
    await records.assert_exactly_once(org, before + while_down)


# ---- (b) NATS restarts while an outbox relay publishes ------------------------------------------


async def test_nats_restart_mid_stream_loses_and_doubles_nothing(
    settings: AuditSettings, records: Records, own_nats: NatsServer, tmp_path: Path,
) -> None:
    """A publishing service (SQLite outbox + OutboxRelay) writes 1,000 events while NATS is
    stopped after ~300 are recorded and started again on the same port and store."""
    org = new_org()
    metadata = new_metadata()
    tables = event_tables(metadata)
    source_db = Database(f"sqlite+aiosqlite:///{tmp_path / 'source.sqlite3'}", schema=None)
    async with source_db.engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    outbox = Outbox(tables, source="wb/user")
    bus = JetStreamBus(own_nats.url, name="test-source")
    relay = OutboxRelay(source_db, bus, tables, batch_size=50, poll_interval_s=0.1)
    written: list[EventEnvelope] = []
    owner = str(uuid.uuid4())

    async def write_events() -> None:
        # 1,000 events, 10 per transaction, over ~3 s: the outage falls in the middle.
        for t in range(100):
            async with source_db.transaction() as s:
                for i in range(10):
                    project = str(uuid.uuid4())
                    written.append(await outbox.record(
                        s, PROJECT_CREATED,
                        {"project_id": project, "name": f"p {t * 10 + i}",
                         "slug": f"p-{t * 10 + i}", "owner_id": owner},
                        org_id=org, actor=f"user:{owner}", subject=project))
            await asyncio.sleep(0.03)

    try:
        await asyncio.wait_for(bus.start(), 10)
        relay.start()
        async with audit_running(settings):
            writer = asyncio.create_task(write_events())
            try:
                await eventually(at_least(records, written, 300), 20, "300 events recorded")
                own_nats.stop()
                down_at = len(written)
                await asyncio.sleep(1.5)  # the relay fails, the outbox keeps what is written
                assert len(written) > down_at, "the writer went on while NATS was down"
                pending_while_down = await relay.pending()
                own_nats.start()  # same port, same store
                await writer
            finally:
                writer.cancel()
            assert len(written) == 1000
            assert pending_while_down > 0
            took = await records.wait_for(written, ACK_WAIT_S + 30,
                                          "all 1,000 recorded after the restart")
            await wait_consumer_settled(own_nats.url, timeout=ACK_WAIT_S + 30)
            await asyncio.sleep(0.5)
        print(f"\n(b) all recorded {took:.1f}s after the writer finished")

        async def drained() -> bool:
            return await relay.pending() == 0

        # An event whose publish reached the stream but whose ack was lost in the restart is
        # recorded already and stays pending in the outbox until the relay's next try (at most
        # MAX_BACKOFF_S later), which the stream deduplicates.
        await eventually(drained, MAX_BACKOFF_S + 5, "the outbox drained")
        await records.assert_exactly_once(org, written)
        # Nothing doubled on the stream either: the relay's retries were deduplicated.
        nc = await nats.connect(own_nats.url)
        try:
            info = await nc.jetstream().stream_info(STREAM)
            assert info.state.messages == 1000
        finally:
            await nc.close()
    finally:
        await relay.stop()
        await bus.close()
        await source_db.dispose()


# ---- (c) the same event twice -------------------------------------------------------------------


async def test_ingest_is_idempotent_by_event_id(records: Records) -> None:
    org = new_org()
    events = project_events(org, 5)
    service, db = records.service, records.db
    async with db.transaction() as s:
        assert await service.ingest(s, events) == 5
    async with db.transaction() as s:
        assert await service.ingest(s, events) == 0
    # A copy of an envelope (as decoded from a redelivery) is the same event.
    copies = [EventEnvelope.from_bytes(e.to_bytes()) for e in events]
    extra = project_events(org, 1, tag="extra")
    async with db.transaction() as s:
        assert await service.ingest(s, [copies[0], *extra, extra[0], copies[3], extra[0]]) == 1
    async with db.transaction() as s:
        assert await service.ingest(s, []) == 0
    await records.assert_exactly_once(org, events + extra)


async def test_concurrent_ingest_of_the_same_events_records_them_once(records: Records) -> None:
    """Two replicas handed the same batch (a redelivery after ack_wait while the first is still
    working): one transaction records it, the other records nothing or fails and is retried;
    the chain stays whole."""
    org = new_org()
    events = project_events(org, 50)
    service, db = records.service, records.db

    async def ingest() -> int | BaseException:
        try:
            async with db.transaction() as s:
                return await service.ingest(s, events)
        except Exception as exc:
            return exc

    results = await asyncio.gather(ingest(), ingest(), ingest())
    written = [r for r in results if isinstance(r, int)]
    assert sum(written) == 50, results
    for r in results:
        if isinstance(r, BaseException):  # what the bus does: try the batch again
            async with db.transaction() as s:
                assert await service.ingest(s, events) == 0
    await records.assert_exactly_once(org, events)


async def test_same_event_published_twice_is_recorded_once(
    settings: AuditSettings, records: Records, publisher: JetStreamBus, own_nats: NatsServer,
) -> None:
    org = new_org()
    first, second = project_events(org, 2)
    nc = await nats.connect(own_nats.url)
    try:
        js = nc.jetstream()
        async with audit_running(settings):
            await publisher.publish(first)
            await publisher.publish(first)  # deduplicated by Nats-Msg-Id
            await publisher.publish(EventEnvelope.from_bytes(first.to_bytes()))
            assert (await js.stream_info(STREAM)).state.messages == 1
            # The same event again with another message id (as after the duplicate window, or
            # from a publisher that sets none): two messages on the stream, one record.
            await js.publish(second.type, second.to_bytes(), stream=STREAM,
                             headers={"Nats-Msg-Id": second.id})
            await js.publish(second.type, second.to_bytes(), stream=STREAM,
                             headers={"Nats-Msg-Id": f"{second.id}-again"})
            await js.publish(second.type, second.to_bytes(), stream=STREAM)
            assert (await js.stream_info(STREAM)).state.messages == 4
            await records.wait_for([first, second], 15)
            await wait_consumer_settled(own_nats.url)
            await asyncio.sleep(0.5)
    finally:
        await nc.close()
    await records.assert_exactly_once(org, [first, second])


async def test_an_event_that_cannot_be_recorded_does_not_hold_back_the_others(
    settings: AuditSettings, records: Records, publisher: JetStreamBus,
) -> None:
    """A batch whose transaction fails is retried one event at a time: the good events of the
    batch and of those after it are recorded, once each, in order; the bad one is not."""
    org = new_org()
    good = project_events(org, 300)
    [bad] = project_events(new_org(), 1, tag="bad")
    bad = bad.model_copy(update={"org_id": "not-an-org-id"})  # no record can hold it
    async with audit_running(settings):
        await publish_all(publisher, [*good[:150], bad, *good[150:]], concurrency=1)
        await records.wait_for(good, 20)
        await asyncio.sleep(0.5)
        assert await records.recorded([bad]) == 0
    await records.assert_exactly_once(org, good)
    async with records.db.transaction() as s:
        seqs = (await s.execute(select(AuditRecord.event_id).where(AuditRecord.chain == org)
                                .order_by(AuditRecord.seq))).scalars().all()
    assert list(seqs) == [e.id for e in good]


# ---- (d) the audit service stops mid-batch ------------------------------------------------------



async def consumer_ack_wait(url: str) -> float:
    """The ack_wait of the audit service's durable consumer (which its consumer loop creates
    shortly after the service starts)."""
    nc = await nats.connect(url)
    try:
        for _ in range(100):
            try:
                info = await nc.jetstream().consumer_info(STREAM, CONSUMER)
            except NotFoundError:
                await asyncio.sleep(0.1)
                continue
            return float(info.config.ack_wait or 0)
        raise AssertionError("the audit consumer was not created within 10 s")
    finally:
        await nc.close()


async def test_audit_stopped_mid_batch_and_restarted_loses_and_doubles_nothing(
    settings: AuditSettings, records: Records, publisher: JetStreamBus, own_nats: NatsServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Events flow the whole time. The audit service is stopped three times while it works:
    (1) between its batch's commit and the acks (the records are in, the bus does not know),
    (2) inside its batch's transaction (nothing is in, nothing acked), (3) wherever it happens
    to be (a clean stop: the batch in hand is finished and acked). Each time it is started
    again; in the end every event is recorded exactly once, the redelivery of the batch that
    was committed but not acked was absorbed, and — because a stop that overruns its grace
    period hands its batch back (nak) — nothing waited out the consumer's 60 s ack_wait."""
    settings = settings.model_copy(update={"consumer_stop_grace_s": 1.0})
    org = new_org()
    events = project_events(org, 1000)
    stop_in: list[str] = [""]  # where the next batch stops: "", "before-ack", "in-transaction"
    reached = asyncio.Event()
    never = asyncio.Event()  # never set: whatever waits on it waits until it is cancelled
    handed = [0]

    real_ingest = AuditService.ingest
    real_ack = Msg.ack

    async def ingest(self: AuditService, s: Any, batch: Sequence[EventEnvelope]) -> int:
        handed[0] += sum(1 for e in batch if e.org_id == org)
        written = await real_ingest(self, s, batch)
        if stop_in[0] == "in-transaction" and written:
            reached.set()
            await never.wait()  # flushed, not committed
        return written

    async def ack(self: Msg) -> None:
        if stop_in[0] == "before-ack":
            reached.set()
            await never.wait()  # committed, not acked
        await real_ack(self)

    monkeypatch.setattr(AuditService, "ingest", ingest)
    monkeypatch.setattr(Msg, "ack", ack)

    async def publish_slowly() -> None:
        for i in range(0, len(events), 10):  # ~8 s in all: longer than three stops
            await publish_all(publisher, events[i:i + 10])
            await asyncio.sleep(0.08)

    flow = asyncio.create_task(publish_slowly())
    try:
        for where, after in (("before-ack", 150), ("in-transaction", 350), ("", 550)):
            async with audit_running(settings):
                assert await consumer_ack_wait(own_nats.url) == ACK_WAIT_S
                await eventually(at_least(records, events, after), 20, f"{after} recorded")
                reached.clear()
                stop_in[0] = where
                if where:
                    await asyncio.wait_for(reached.wait(), 10)
                # leaving the block stops the consumer wherever it is
            stop_in[0] = ""
            assert not flow.done(), "events flow while the service stops"
        await flow
        async with audit_running(settings):
            took = await records.wait_for(events, ACK_WAIT_S / 2,
                                          "every event recorded after the last restart")
            await wait_consumer_settled(own_nats.url, timeout=ACK_WAIT_S / 2)
            await asyncio.sleep(0.5)
    finally:
        flow.cancel()
    print(f"\n(d) every event recorded {took:.1f}s after the last restart "
          f"(ack_wait {ACK_WAIT_S:.0f}s)")
    await records.assert_exactly_once(org, events)
    assert handed[0] > len(events), "no batch was delivered again"
