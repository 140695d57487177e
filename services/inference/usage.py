"""Metering of model calls: the org's token quota checked before a call (a cached read of the
user service's `tokens_per_day` plus the tokens not yet recorded there; past the limit: 429),
and after it the call's metrics (at once, in memory), a usage event per call and the tokens on
the org's quota — written by a background writer that gathers the calls of a short window
(`inference_usage_flush_s`) into one transaction and one quota update per org, off the
requests' path — and an event per safety-rule hit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from services.inference import safety
from services.inference.events import Events
from services.inference.metrics import Metrics
from workbench import context
from workbench.client import ServiceClient, raise_for_problem
from workbench.db import Database
from workbench.errors import WorkbenchError
from workbench.identity.principal import Principal

log = logging.getLogger("services.inference")
TOKENS = "tokens_per_day"


class QuotaExhausted(WorkbenchError):
    status = 429
    code = "quota_exceeded"
    title = "Quota exceeded"


class Metering:
    def __init__(self, db: Database, events: Events, metrics: Metrics, user: ServiceClient,
                 *, cache_s: float, flush_s: float = 0.25, max_pending: int = 100_000) -> None:
        self.db = db
        self.events = events
        self.metrics = metrics
        self.user = user
        self.cache_s = cache_s
        self.flush_s = flush_s
        self.max_pending = max_pending
        self._quota: dict[uuid.UUID, tuple[float, int, int]] = {}  # org -> (read at, limit, used)
        self._pending: list[Call] = []  # finished calls whose usage event is not written yet
        # Tokens of finished calls not yet on the org's quota in the user service.
        self._owed: defaultdict[uuid.UUID, int] = defaultdict(int)
        self._unwritten: defaultdict[uuid.UUID, int] = defaultdict(int)  # of self._pending
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failures = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="inference-metering")

    async def close(self) -> None:
        """Stops the writer and writes what is left (a stop loses no usage)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()

    def submit(self, call: Call) -> None:
        self._pending.append(call)
        self._unwritten[call.org_id] += call.tokens
        if len(self._pending) > self.max_pending:  # the database has been down for long
            dropped = self._pending.pop(0)
            self._unwritten[dropped.org_id] -= dropped.tokens
            log.error("usage of a call to %s dropped: %d calls wait to be metered",
                      dropped.model, len(self._pending))
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            # The calls finishing in the next moments go into the same write.
            await asyncio.sleep(self.flush_s if not self._failures
                                else min(30.0, self.flush_s * 2 ** self._failures))
            self._wake.clear()
            await self.flush()
            if self._pending or any(self._owed.values()):
                self._wake.set()  # failed (retried with backoff) or more arrived meanwhile

    async def flush(self) -> None:
        """Writes the pending usage events in one transaction, then adds the tokens to each
        org's quota in one call per org. A failure keeps them for the next attempt."""
        batch, self._pending = self._pending, []
        if batch:
            try:
                async with self.db.transaction() as s:
                    for call in batch:
                        await call.write(s)
            except BaseException as exc:  # cancelled too (a stop): kept for close()'s flush
                self._pending[:0] = batch
                if not isinstance(exc, Exception):
                    raise
                log.exception("writing the usage of %d model calls failed; retrying",
                              len(batch))
                self._failures += 1
                return
            for call in batch:
                self._unwritten[call.org_id] -= call.tokens
                self._owed[call.org_id] += call.tokens
        failed = False
        for org_id, tokens in list(self._owed.items()):
            if tokens <= 0:
                del self._owed[org_id]
                continue
            try:
                await self._record_tokens(org_id, tokens)
            except Exception:
                log.exception("adding %d tokens to the quota of org %s failed; retrying",
                              tokens, org_id)
                failed = True
                continue
            self._owed[org_id] -= tokens
        self._failures = self._failures + 1 if failed else 0

    def _not_recorded(self, org_id: uuid.UUID) -> int:
        return self._owed.get(org_id, 0) + self._unwritten.get(org_id, 0)

    async def check_quota(self, org_id: uuid.UUID) -> None:
        now = time.monotonic()
        cached = self._quota.get(org_id)
        if cached is None or now - cached[0] > self.cache_s:
            r = await self.user.get(f"/internal/v1/orgs/{org_id}/quotas/{TOKENS}")
            raise_for_problem(r)
            q = r.json()
            cached = (now, int(q["limit"]), int(q["used"]))
            self._quota[org_id] = cached
        _, limit, used = cached
        used += self._not_recorded(org_id)
        if used >= limit:
            raise QuotaExhausted(f"the organization's token quota is used up ({used:,} of "
                                 f"{limit:,} tokens); ask an operator to raise "
                                 f"{TOKENS}", extra={"limit": limit, "used": used})

    def call(self, p: Principal, *, deployment_id: str, model: str, route: str | None,
             endpoint: str) -> Call:
        ctx = context.current()
        return Call(self, org_id=p.org_id, actor=p.actor, key_id=p.key_id or "",
                    deployment_id=deployment_id, model=model, route=route, endpoint=endpoint,
                    request_id=ctx.request_id if ctx else None, ctx=ctx)

    async def _record_tokens(self, org_id: uuid.UUID, tokens: int) -> None:
        if tokens <= 0:
            return
        r = await self.user.post("/internal/v1/quotas/record", json={
            "org_id": str(org_id), "resource": TOKENS, "amount": tokens}, idempotent=False)
        raise_for_problem(r)
        q = r.json()
        self._quota[org_id] = (time.monotonic(), int(q["limit"]), int(q["used"]))


@dataclass
class Call:
    meter: Metering
    org_id: uuid.UUID
    actor: str
    key_id: str
    deployment_id: str
    model: str
    route: str | None
    endpoint: str
    request_id: str | None
    ctx: context.RequestContext | None = None  # the events carry the request's id and trace
    started: float = field(default_factory=time.perf_counter)
    done: bool = False
    _usage: dict[str, Any] = field(default_factory=dict)

    async def safety_hits(self, hits: list[safety.Hit]) -> None:
        if not hits:
            return
        async with self.meter.db.transaction() as s:
            for h in hits:
                await self.meter.events.safety_triggered(s, org_id=str(self.org_id),
                                                         actor=self.actor, data={
                    "rule_id": h.rule_id, "rule_name": h.rule_name, "stage": h.stage,
                    "action": h.action, "count": h.count, "model": self.model,
                    "key_id": self.key_id})

    def finish(self, *, ok: bool, prompt_tokens: int = 0, completion_tokens: int = 0,
               first_token_at: float | None = None) -> None:
        """Metrics at once; the usage event and the quota by the metering writer — once per
        call, whatever happened."""
        if self.done:
            return
        self.done = True
        latency = time.perf_counter() - self.started
        ttft = first_token_at - self.started if first_token_at is not None else None
        self.meter.metrics.record(self.deployment_id, route=self.route, endpoint=self.endpoint,
                                  ok=ok, latency_s=latency, ttft_s=ttft,
                                  prompt_tokens=prompt_tokens,
                                  completion_tokens=completion_tokens)
        self._usage = {
            "deployment_id": self.deployment_id, "model": self.model,
            "route": self.route or "", "endpoint": self.endpoint, "key_id": self.key_id,
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "latency_ms": int(latency * 1000), "ok": ok}
        self.meter.submit(self)

    @property
    def tokens(self) -> int:
        return int(self._usage.get("prompt_tokens", 0)) + int(
            self._usage.get("completion_tokens", 0))

    async def write(self, s: AsyncSession) -> None:
        """The usage event, in the writer's transaction, as if recorded by the request."""
        token = context.bind(self.ctx) if self.ctx is not None else None
        try:
            await self.meter.events.usage(s, org_id=str(self.org_id), actor=self.actor,
                                          data=self._usage)
        finally:
            if token is not None:
                context.reset(token)
