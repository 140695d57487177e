"""Metering of model calls: the org's token quota checked before a call (a cached read of the
user service's `tokens_per_day`; past the limit: 429), and after it the tokens recorded there,
the call's metrics, a usage event per call and an event per safety-rule hit."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

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
                 *, cache_s: float) -> None:
        self.db = db
        self.events = events
        self.metrics = metrics
        self.user = user
        self.cache_s = cache_s
        self._quota: dict[uuid.UUID, tuple[float, int, int]] = {}  # org -> (read at, limit, used)

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
        if used >= limit:
            raise QuotaExhausted(f"the organization's token quota is used up ({used:,} of "
                                 f"{limit:,} tokens); ask an operator to raise "
                                 f"{TOKENS}", extra={"limit": limit, "used": used})

    def call(self, p: Principal, *, deployment_id: str, model: str, route: str | None,
             endpoint: str) -> Call:
        ctx = context.current()
        return Call(self, org_id=p.org_id, actor=p.actor, key_id=p.key_id or "",
                    deployment_id=deployment_id, model=model, route=route, endpoint=endpoint,
                    request_id=ctx.request_id if ctx else None)

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

    async def finish(self, *, ok: bool, prompt_tokens: int = 0, completion_tokens: int = 0,
                     first_token_at: float | None = None) -> None:
        """Metrics, the usage event and the quota — once per call, whatever happened."""
        if self.record(ok=ok, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                       first_token_at=first_token_at):
            await self.flush()

    def record(self, *, ok: bool, prompt_tokens: int = 0, completion_tokens: int = 0,
               first_token_at: float | None = None) -> bool:
        """The call's metrics (in memory, at once); False if the call was already recorded.
        `flush()` then writes what needs I/O — after the response, off the caller's path."""
        if self.done:
            return False
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
        return True

    async def flush(self) -> None:
        """The usage event and the tokens on the org's quota."""
        try:
            async with self.meter.db.transaction() as s:
                await self.meter.events.usage(s, org_id=str(self.org_id), actor=self.actor,
                                              data=self._usage)
            await self.meter._record_tokens(
                self.org_id, self._usage["prompt_tokens"] + self._usage["completion_tokens"])
        except Exception:
            log.exception("metering a call to %s failed", self.model)
