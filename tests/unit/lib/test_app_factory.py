"""The app factory gives every service the same ops endpoints and the same error format."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import APIRouter

from workbench.app import create_app
from workbench.errors import Conflict, NotFound
from workbench.settings import CoreSettings

router = APIRouter()


@router.get("/boom")
async def boom() -> None:
    raise RuntimeError("secret internal detail /srv/app.py line 3")


@router.get("/missing")
async def missing() -> None:
    raise NotFound("widget 42 does not exist")


@router.post("/conflict")
async def conflict() -> None:
    raise Conflict("already there", code="widget_exists", extra={"widget": 42})


healthy = {"ok": True}


async def dependency_check() -> None:
    if not healthy["ok"]:
        raise ConnectionError("database refused the connection")


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(service="demo", settings=CoreSettings(access_log=False), routers=[router],
                     readiness={"database": dependency_check})
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        yield c


async def test_unexpected_error_is_500_problem_without_internals(client: httpx.AsyncClient) -> None:
    r = await client.get("/boom", headers={"x-request-id": "req-123"})
    assert r.status_code == 500
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["code"] == "internal_error" and body["request_id"] == "req-123"
    assert "secret" not in r.text and "Traceback" not in r.text and ".py" not in r.text
    assert r.headers["x-request-id"] == "req-123"


async def test_domain_errors_map_to_their_status(client: httpx.AsyncClient) -> None:
    r = await client.get("/missing")
    assert r.status_code == 404 and r.json()["detail"] == "widget 42 does not exist"
    r = await client.post("/conflict")
    assert r.status_code == 409
    assert r.json()["code"] == "widget_exists" and r.json()["widget"] == 42


async def test_unknown_route_and_wrong_method_are_problems(client: httpx.AsyncClient) -> None:
    r = await client.get("/nope")
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    r = await client.delete("/missing")
    assert r.status_code == 405 and r.json()["code"] == "method_not_allowed"


async def test_readyz_reports_a_failing_dependency(client: httpx.AsyncClient) -> None:
    assert (await client.get("/readyz")).status_code == 200
    healthy["ok"] = False
    try:
        r = await client.get("/readyz")
    finally:
        healthy["ok"] = True
    assert r.status_code == 503
    assert "database refused the connection" in r.json()["checks"]["database"]


async def test_metrics_count_requests_by_route(client: httpx.AsyncClient) -> None:
    await client.get("/missing")
    text = (await client.get("/metrics")).text
    assert 'wb_http_requests_total{method="GET",route="/missing",service="demo",status="404"}' \
        in text


async def test_invalid_request_id_is_replaced(client: httpx.AsyncClient) -> None:
    r = await client.get("/healthz", headers={"x-request-id": "bad id with spaces"})
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    assert " " not in rid and len(rid) == 32
