"""Event throughput: N platform events published through the shared bus (`JetStreamBus.publish`,
a bounded number in flight) and recorded by the audit service (its in-process JetStream batch
consumer, records committed to PostgreSQL in per-org hash chains), against raw nats-py doing
the least the same delivery needs: the same number of same-size messages published with
`js.publish` (same concurrency, same Nats-Msg-Id dedupe header, a file-backed stream like
WB_EVENTS) and consumed by a durable pull consumer (fetch batches of the audit batch size, ack
each) in the same process. Same run, same machine, same NATS server, uvloop as `wb serve`.

    .venv/bin/python bench/events_throughput.py [--events 20000] [--concurrency 256]
                                                [--orgs 10] [--rounds 2] [--batch 500]

Each figure is events per second from the first publish until the last event is recorded
(audit: the round's records are committed, polled every 20 ms from the round's chain heads and
checked with a count(*) afterwards) or consumed and acked (raw).
Rounds alternate raw and audit; the best round of each is compared.
Target: audit / raw >= 0.50.

Before each audit round audit_records is ANALYZEd, as autovacuum does in a running system (it
wakes once a minute; the whole run is shorter). Without it (`--no-analyze`) a generic plan that
PostgreSQL cached for the ingest's dedupe query (`event_id IN (<500 parameters>)`, a prepared
statement of asyncpg) while the table was nearly empty stays in use: a sequential scan, slower
with every batch (measured: ~3 ms per batch at 20k rows, ~140 ms at 40k, ~260 ms at 60k), and
the audit rate falls round after round (measured: 5,200 -> 1,700 -> 1,400 -> 900 events/s).

Starts its own NATS (JetStream) and SeaweedFS (the audit service requires S3 in distributed
mode; ingestion does not use it), creates a fresh PostgreSQL database on 127.0.0.1:5432 (user
postgres) and removes all of them at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import nats
import uvloop
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig

from services.audit import app as audit_app
from services.audit.settings import AuditSettings
from workbench.db import Database
from workbench.events.envelope import EventEnvelope
from workbench.events.nats_bus import JetStreamBus
from workbench.migrations import upgrade
from workbench.testing import NatsServer, SeaweedServer, create_pg_database, drop_pg_database

SECRET = "bench-secret-key-0123456789abcdef"
INTERNAL = "bench-internal-token-0123456789ab"
RAW_STREAM = "BENCH_RAW"
WARMUP = 1000


def make_events(n: int, orgs: list[str]) -> list[EventEnvelope]:
    owners = {org: str(uuid.uuid4()) for org in orgs}
    out = []
    for i in range(n):
        org = orgs[i % len(orgs)]
        project = str(uuid.uuid4())
        out.append(EventEnvelope(
            type="wb.user.project.created", source="wb/user", subject=project, org_id=org,
            actor=f"user:{owners[org]}", request_id=uuid.uuid4().hex,
            traceparent=f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01",
            data={"project_id": project, "name": f"Project {i}", "slug": f"project-{i}",
                  "owner_id": owners[org]}))
    return out


async def bounded(n: int, concurrency: int, publish: Callable[[int], Awaitable[None]]) -> None:
    """Calls `publish(i)` for i in 0..n-1 in order, with at most `concurrency` outstanding."""
    next_i = 0

    async def worker() -> None:
        nonlocal next_i
        while next_i < n:
            i = next_i
            next_i += 1
            await publish(i)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))


# ---- raw nats-py ------------------------------------------------------------------------------


class Raw:
    def __init__(self, url: str, batch: int) -> None:
        self.url, self.batch = url, batch
        self.consumed = 0

    async def start(self) -> None:
        self.pub = await nats.connect(self.url, name="bench-raw-publisher")
        self.sub_nc = await nats.connect(self.url, name="bench-raw-consumer")
        self.js = self.pub.jetstream()
        await self.js.add_stream(StreamConfig(name=RAW_STREAM, subjects=["bench.>"],
                                              storage=StorageType.FILE, duplicate_window=300.0))
        # The same consumer settings as workbench.events.nats_bus gives the audit consumer.
        self.sub = await self.sub_nc.jetstream().pull_subscribe(
            "bench.>", durable="raw", stream=RAW_STREAM,
            config=ConsumerConfig(durable_name="raw", ack_policy=AckPolicy.EXPLICIT,
                                  deliver_policy=DeliverPolicy.ALL, max_deliver=10,
                                  ack_wait=60, max_ack_pending=max(self.batch * 4, 1000)))
        self.changed = asyncio.Event()
        self.task = asyncio.create_task(self._consume())

    async def _consume(self) -> None:
        while True:
            try:
                msgs = await self.sub.fetch(self.batch, timeout=1.0)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            await asyncio.gather(*(m.ack() for m in msgs))
            self.consumed += len(msgs)
            self.changed.set()

    async def run(self, payloads: list[tuple[str, bytes]],
                  concurrency: int) -> tuple[float, float]:
        """(seconds to publish all, seconds until all are consumed)."""
        target = self.consumed + len(payloads)

        async def publish(i: int) -> None:
            msg_id, body = payloads[i]
            await self.js.publish("bench.user.project.created", body, stream=RAW_STREAM,
                                  headers={"Nats-Msg-Id": msg_id}, timeout=5.0)

        t0 = time.perf_counter()
        await bounded(len(payloads), concurrency, publish)
        published = time.perf_counter() - t0
        while self.consumed < target:
            self.changed.clear()
            await self.changed.wait()
        return published, time.perf_counter() - t0

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.sub_nc.close()
        await self.pub.close()


# ---- the shared bus into the audit service ----------------------------------------------------


class Audit:
    def __init__(self, settings: AuditSettings, dsn: str) -> None:
        self.settings, self.dsn = settings, dsn

    async def start(self) -> None:
        self.app = audit_app.create_app(self.settings)
        self.lifespan = self.app.router.lifespan_context(self.app)
        await self.lifespan.__aenter__()
        self.bus = JetStreamBus(self.settings.nats_url, name="bench-publisher")
        await self.bus.start()
        self.pg = await asyncpg.connect(self.dsn)

    async def recorded(self, chains: list[str]) -> int:
        """Records committed in these chains: their heads' last_seq, which moves in the
        transaction that adds the records (a count(*) every 20 ms would scan the growing table
        and slow PostgreSQL down on a small machine)."""
        return int(await self.pg.fetchval(
            "SELECT coalesce(sum(last_seq), 0) FROM wb_audit.audit_chain_heads "
            "WHERE chain = ANY($1::text[])", chains))

    async def count(self, chains: list[str]) -> int:
        return int(await self.pg.fetchval(
            "SELECT count(*) FROM wb_audit.audit_records WHERE chain = ANY($1::text[])", chains))

    async def analyze(self) -> None:
        await self.pg.execute("ANALYZE wb_audit.audit_records")

    async def run(self, events: list[EventEnvelope], concurrency: int) -> tuple[float, float]:
        """`events` belong to orgs of their own (fresh chains)."""
        chains = sorted({str(e.org_id) for e in events})
        assert await self.recorded(chains) == 0

        async def publish(i: int) -> None:
            await self.bus.publish(events[i])

        async def poll() -> float:
            while await self.recorded(chains) < len(events):
                await asyncio.sleep(0.02)
            return time.perf_counter()

        t0 = time.perf_counter()
        watcher = asyncio.create_task(poll())
        await bounded(len(events), concurrency, publish)
        published = time.perf_counter() - t0
        done = await watcher
        count = await self.count(chains)
        if count != len(events):
            raise AssertionError(f"{count} records for {len(events)} events")
        return published, done - t0

    async def close(self) -> None:
        await self.pg.close()
        await self.bus.close()
        await self.lifespan.__aexit__(None, None, None)


async def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING)
    workdir = Path(tempfile.mkdtemp(prefix="wb-bench-events-"))
    nats_server = NatsServer(workdir / "nats")
    s3 = SeaweedServer(workdir / "s3")
    try:
        nats_server.start()
        s3.start()
        db_name, db_url = await create_pg_database("wb_bench_events")
        try:
            await measure(args, workdir, nats_server, s3, db_url)
        finally:
            await drop_pg_database(db_name)
    finally:
        s3.stop()
        nats_server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def measure(args: argparse.Namespace, workdir: Path, nats_server: NatsServer,
                  s3: SeaweedServer, db_url: str) -> None:
    raw: Raw | None = None
    audit: Audit | None = None
    try:
        s3_env = s3.env(bucket="wb-bench-events")
        settings = AuditSettings(
            mode="distributed", database_url=db_url, nats_url=nats_server.url,
            secret_key=SECRET, internal_token=INTERNAL,
            jwks_url="http://127.0.0.1:9/unused/jwks.json",
            s3_endpoint=s3_env["WB_S3_ENDPOINT"], s3_access_key=s3_env["WB_S3_ACCESS_KEY"],
            s3_secret_key=s3_env["WB_S3_SECRET_KEY"], s3_bucket=s3_env["WB_S3_BUCKET"],
            access_log=False, log_level="WARNING", data_dir=workdir / "data",
            audit_batch_size=args.batch)
        db = Database.for_service("audit", settings, settings)
        await upgrade(db, audit_app.MIGRATIONS, "audit")
        await db.dispose()

        def orgs() -> list[str]:  # fresh chains for each round
            return [str(uuid.uuid4()) for _ in range(args.orgs)]

        rounds = [make_events(args.events, orgs()) for _ in range(args.rounds)]
        warm = make_events(WARMUP, orgs())
        size = statistics.mean(len(e.to_bytes()) for e in rounds[0])

        def raw_payloads(events: list[EventEnvelope]) -> list[tuple[str, bytes]]:
            # Same bytes as the bus sends; fresh ids so nothing is deduplicated.
            return [(uuid.uuid4().hex, e.to_bytes()) for e in events]

        raw = Raw(nats_server.url, settings.audit_batch_size)
        await raw.start()
        audit = Audit(settings, db_url.replace("postgresql+asyncpg://", "postgresql://"))
        await audit.start()
        await raw.run(raw_payloads(warm), args.concurrency)
        await audit.run(warm, args.concurrency)

        print(f"{args.events} events per round, {size:.0f} bytes each, {args.orgs} orgs, "
              f"{args.concurrency} publishes in flight, consumer batch "
              f"{settings.audit_batch_size}, {args.rounds} round(s)")
        raw_rates: list[float] = []
        audit_rates: list[float] = []
        for r, events in enumerate(rounds, 1):
            pub, total = await raw.run(raw_payloads(events), args.concurrency)
            raw_rates.append(args.events / total)
            print(f"round {r} raw nats-py : published in {pub:6.2f}s, consumed in {total:6.2f}s"
                  f" -> {raw_rates[-1]:8.0f} events/s")
            if not args.no_analyze:
                await audit.analyze()
            pub, total = await audit.run(events, args.concurrency)
            audit_rates.append(args.events / total)
            print(f"round {r} bus + audit : published in {pub:6.2f}s, recorded in {total:6.2f}s"
                  f" -> {audit_rates[-1]:8.0f} events/s")
        ratio = max(audit_rates) / max(raw_rates)
        print(f"\nraw nats-py (publish -> consume+ack) : {max(raw_rates):8.0f} events/s")
        print(f"bus -> audit records in PostgreSQL   : {max(audit_rates):8.0f} events/s")
        print(f"ratio audit / raw                    : {ratio:8.2f}  (target >= 0.50: "
              f"{'met' if ratio >= 0.5 else 'NOT met'})")
    finally:
        if audit is not None:
            await audit.close()
        if raw is not None:
            await raw.close()


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=256, help="publishes in flight")
    p.add_argument("--orgs", type=int, default=10, help="organizations (hash chains)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no-analyze", action="store_true",
                   help="skip the ANALYZE of audit_records before each audit round")
    p.add_argument("--batch", type=int, default=AuditSettings().audit_batch_size,
                   help="events per consumer fetch (WB_AUDIT_BATCH_SIZE), raw and audit alike")
    return p.parse_args()


if __name__ == "__main__":
    uvloop.run(main(parse()))
