"""The metering writer: usage events written in windows, tokens on the org's quota, nothing lost
when the quota service fails for a while or the service stops. Real SQLite outbox; the user
service is a small ASGI stand-in that can be told to fail (to inject the failure)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy import text

from services.inference.events import Events
from services.inference.metrics import Metrics
from services.inference.models import Base
from services.inference.usage import Call, Metering, QuotaExhausted
from workbench.client import ServiceClient
from workbench.db import Database

LIMIT = 100


def quota_service() -> tuple[FastAPI, dict[str, Any]]:
    state: dict[str, Any] = {"used": {}, "fail": 0, "calls": 0}
    app = FastAPI()

    @app.post("/internal/v1/quotas/record")
    async def record(body: dict[str, Any]) -> Any:
        state["calls"] += 1
        if state["fail"]:
            state["fail"] -= 1
            return JSONResponse({"title": "down"}, status_code=503)
        used = state["used"].get(body["org_id"], 0) + body["amount"]
        state["used"][body["org_id"]] = used
        return {"resource": body["resource"], "limit": LIMIT, "used": used}

    @app.get("/internal/v1/orgs/{org_id}/quotas/tokens_per_day")
    async def read(org_id: str) -> Any:
        return {"resource": "tokens_per_day", "limit": LIMIT,
                "used": state["used"].get(org_id, 0)}

    return app, state


@pytest.fixture
async def setup(tmp_path: Path) -> Any:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'inference.sqlite3'}", schema=None)
    async with db.engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    app, state = quota_service()
    user = ServiceClient("user", "http://user", transport=httpx.ASGITransport(app), retries=0)
    meter = Metering(db, Events(), Metrics(), user, cache_s=0, flush_s=0.05)
    yield db, meter, state
    await meter.close()
    await user.aclose()
    await db.dispose()


def call(meter: Metering, org: uuid.UUID, tokens: int, ok: bool = True) -> None:
    c = Call(meter, org_id=org, actor="user:test", key_id="k1", deployment_id="d1",
             model="embedder", route=None, endpoint="embeddings", request_id=None)
    c.finish(ok=ok, prompt_tokens=tokens)
    c.finish(ok=False)  # a second finish of the same call counts nothing


async def usage_events(db: Database) -> list[dict[str, Any]]:
    async with db.engine.connect() as conn:
        rows = (await conn.execute(text(
            "SELECT payload FROM wb_outbox WHERE type = 'wb.inference.usage.recorded'"))).all()
    return [orjson.loads(r[0]) for r in rows]


async def settle(meter: Metering, state: dict[str, Any], org: uuid.UUID, used: int) -> None:
    for _ in range(200):
        if state["used"].get(str(org)) == used and not meter._not_recorded(org):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"quota never reached {used}: {state}")


async def test_calls_become_events_and_quota_in_one_write(setup: Any) -> None:
    db, meter, state = setup
    meter.start()
    org = uuid.uuid4()
    for tokens in (3, 4, 5):
        call(meter, org, tokens)
    call(meter, org, 0, ok=False)
    await settle(meter, state, org, 12)
    events = await usage_events(db)
    assert sorted(e["data"]["prompt_tokens"] for e in events) == [0, 3, 4, 5]
    assert {e["org_id"] for e in events} == {str(org)}
    assert state["calls"] == 1  # the four calls of the window: one quota update


async def test_quota_failure_keeps_the_tokens_and_counts_them(setup: Any) -> None:
    db, meter, state = setup
    state["fail"] = 2  # the user service refuses the next two updates
    meter.start()
    org = uuid.uuid4()
    call(meter, org, 60)
    call(meter, org, 45)
    # Not yet on the quota in the user service, but counted: 105 of 100 → refused.
    with pytest.raises(QuotaExhausted):
        await meter.check_quota(org)
    await settle(meter, state, org, 105)
    assert len(await usage_events(db)) == 2  # written once, although the quota update retried
    assert state["calls"] == 3


async def test_close_writes_what_is_pending(setup: Any) -> None:
    db, meter, state = setup
    meter.flush_s = 30  # the writer would wait long: the stop must not
    meter.start()
    org = uuid.uuid4()
    call(meter, org, 7)
    await asyncio.sleep(0.05)
    await meter.close()
    assert [e["data"]["prompt_tokens"] for e in await usage_events(db)] == [7]
    assert state["used"][str(org)] == 7
