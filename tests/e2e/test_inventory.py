"""Every route of every app, enumerated from the routers themselves (not from OpenAPI), answers
401 problem+json to a caller without credentials — through the gateway in both run modes, and
directly at each service in distributed mode — unless it is in the explicit public list below.
Routes the gateway does not route (`/internal/...`) are not reachable through it at all.

A route added anywhere is enumerated automatically: it must be either public (and listed here)
or refuse anonymous callers."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute, Mount, Route

from gateway.app import create_gateway
from gateway.routes import ROUTE_TABLE, route_for
from gateway.settings import GatewaySettings
from services.cli import SERVICES
from workbench.internal import INTERNAL_TOKEN_HEADER

GATEWAY = "gateway"

# (method, path template) that a caller without credentials may use. Anything else must be 401.
PUBLIC: frozenset[tuple[str, str]] = frozenset({
    # ops
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    # API docs: the spec, the Swagger page and its static files
    ("GET", "/openapi.json"),
    ("HEAD", "/openapi.json"),
    ("GET", "/docs"),
    ("HEAD", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("HEAD", "/docs/oauth2-redirect"),
    ("GET", "/docs/static/{path}"),
    ("HEAD", "/docs/static/{path}"),
    # signing up and in
    ("POST", "/api/v1/auth/register"),
    ("POST", "/api/v1/auth/login"),
    ("POST", "/api/v1/auth/refresh"),
    ("GET", "/.well-known/jwks.json"),
})

PARAM = re.compile(r"\{[^}]+\}")
PROBLEM = "application/problem+json"


# ---- enumeration from the routers ------------------------------------------------------------

def walk_routes(routes: Sequence[BaseRoute], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(method, path template) of every route, descending into mounts and included routers.
    An unknown kind of route fails loudly instead of being skipped."""
    for route in routes:
        if isinstance(route, APIRoute | Route):
            for method in sorted(route.methods or ()):
                yield method, prefix + route.path
        elif isinstance(route, Mount):
            sub = route.routes
            if sub:
                yield from walk_routes(sub, prefix + route.path)
            else:  # an ASGI app mounted as a whole (static files): any path below it
                path = prefix + route.path.rstrip("/") + "/{path}"
                yield from (("GET", path), ("HEAD", path))
        elif hasattr(route, "original_router") and hasattr(route, "include_context"):
            # FastAPI's lazily included router: its routes carry their own router prefix;
            # the include adds include_context.prefix in front.
            yield from walk_routes(route.original_router.routes,
                                   prefix + route.include_context.prefix)
        else:
            raise AssertionError(f"unknown route kind {type(route).__name__} ({route!r}): "
                                 "teach walk_routes about it")


def build_service_app(name: str) -> FastAPI:
    spec = SERVICES[name]
    app: FastAPI = spec.load().create_app(spec.make_settings())  # constructed, never started
    return app


def build_gateway_ops() -> FastAPI:
    ops: FastAPI = create_gateway(GatewaySettings()).ops  # type: ignore[attr-defined]
    return ops


@pytest.fixture(scope="module")
def inventory() -> dict[str, list[tuple[str, str]]]:
    """app name → sorted (method, path template) of all its routes."""
    apps: dict[str, FastAPI] = {name: build_service_app(name) for name in SERVICES}
    apps[GATEWAY] = build_gateway_ops()
    return {name: sorted(set(walk_routes(app.routes))) for name, app in apps.items()}


def concrete(template: str) -> str:
    return PARAM.sub(lambda _: str(uuid.uuid4()), template)


def is_problem(r: httpx.Response, status: int) -> bool:
    """problem+json with this status — or, on the OpenAI-compatible routes (/v1/…), OpenAI's
    error shape, which their clients expect."""
    if r.request.url.path.startswith("/v1/"):
        body = r.json() if r.status_code == status else None
        return isinstance(body, dict) and isinstance(body.get("error"), dict) and bool(
            body["error"].get("code")) and bool(body["error"].get("message"))
    if r.status_code != status or not r.headers.get("content-type", "").startswith(PROBLEM):
        return False
    if r.request.method == "HEAD":
        return True
    body: Any = r.json()
    return isinstance(body, dict) and body.get("status") == status and bool(body.get("code"))


def describe(app: str, method: str, template: str, r: httpx.Response) -> str:
    return (f"{app}: {method} {template} -> {r.status_code} "
            f"{r.headers.get('content-type', '')} {r.text[:160]!r}")


# ---- the enumeration itself is sound ---------------------------------------------------------

def test_inventory_finds_every_router_of_every_app(
    inventory: dict[str, list[tuple[str, str]]],
) -> None:
    assert set(inventory) == {*SERVICES, GATEWAY}
    user_paths = {p for _, p in inventory["user"]}
    for prefix, service in ROUTE_TABLE:
        paths = {p for _, p in inventory[service]}
        assert any(p == prefix or p.startswith(prefix + "/") for p in paths), (
            f"no route of {service} under routed prefix {prefix}")
    assert any(p.startswith("/internal/") for p in user_paths)
    assert ("GET", "/docs/static/{path}") in inventory[GATEWAY]
    assert ("DELETE", "/api/v1/orgs/{org_id}/members/{user_id}") in inventory["user"]


def test_public_list_names_only_routes_that_exist(
    inventory: dict[str, list[tuple[str, str]]],
) -> None:
    existing = {route for routes in inventory.values() for route in routes}
    assert sorted(PUBLIC - existing) == []


# ---- anonymous callers -----------------------------------------------------------------------

def test_every_non_public_route_is_401_problem_through_the_gateway(
    client: httpx.Client, inventory: dict[str, list[tuple[str, str]]],
) -> None:
    offenders: list[str] = []
    checked = 0
    gateway_paths = {p for _, p in inventory[GATEWAY]}
    for app, routes in inventory.items():
        for method, template in routes:
            if app != GATEWAY and route_for(template) is None:
                continue  # not routed by the gateway: the next test
            if app != GATEWAY and template in gateway_paths:
                continue  # answered by the gateway itself: checked as a gateway route
            r = client.request(method, concrete(template))
            checked += 1
            if (method, template) in PUBLIC:
                if r.status_code in (401, 403) or r.status_code >= 500:
                    offenders.append("public but refused/failed: "
                                     + describe(app, method, template, r))
            elif not is_problem(r, 401):
                offenders.append("expected 401 problem: " + describe(app, method, template, r))
    assert checked > 20
    assert offenders == [], "\n".join(offenders)


def test_routes_the_gateway_does_not_route_are_404_through_it(
    platform: Any, client: httpx.Client, inventory: dict[str, list[tuple[str, str]]],
) -> None:
    offenders: list[str] = []
    unrouted = 0
    gateway_paths = {p for _, p in inventory[GATEWAY]}
    for app, routes in inventory.items():
        if app == GATEWAY:
            continue
        for method, template in routes:
            if route_for(template) is not None or template in gateway_paths:
                continue
            unrouted += 1
            path = concrete(template)
            # Neither anonymous nor with the deployment's internal token (the gateway strips it).
            for headers in ({}, {INTERNAL_TOKEN_HEADER: platform.env["WB_INTERNAL_TOKEN"]}):
                r = client.request(method, path, headers=headers)
                if not is_problem(r, 404):
                    offenders.append(describe(app, method, template, r)
                                     + (" (with internal token)" if headers else ""))
    assert unrouted > 0  # at least the /internal/ routes
    assert offenders == [], "\n".join(offenders)


def test_every_non_public_route_is_401_problem_at_each_service_directly(
    distributed_platform: Any, inventory: dict[str, list[tuple[str, str]]],
) -> None:
    """Each service the distributed platform exposes (`<name>_url`), bypassing the gateway."""
    urls = {name: getattr(distributed_platform, f"{name}_url", None) for name in SERVICES}
    urls = {name: url for name, url in urls.items() if url}
    assert "user" in urls
    offenders: list[str] = []
    for name, url in urls.items():
        with distributed_platform.client() as direct:
            direct.base_url = httpx.URL(url)
            for method, template in inventory[name]:
                r = direct.request(method, concrete(template))
                assert str(r.request.url).startswith(url)
                if (method, template) in PUBLIC:
                    if r.status_code in (401, 403) or r.status_code >= 500:
                        offenders.append("public but refused/failed: "
                                         + describe(name, method, template, r))
                elif not is_problem(r, 401):
                    offenders.append("expected 401 problem: "
                                     + describe(name, method, template, r))
    assert offenders == [], "\n".join(offenders)


def test_internal_routes_refuse_a_wrong_internal_token_at_the_user_service(
    distributed_platform: Any, inventory: dict[str, list[tuple[str, str]]],
) -> None:
    internal = [(m, t) for m, t in inventory["user"] if t.startswith("/internal/")]
    assert internal
    offenders: list[str] = []
    with distributed_platform.client() as direct:
        direct.base_url = httpx.URL(distributed_platform.user_url)
        for method, template in internal:
            r = direct.request(method, concrete(template),
                               headers={INTERNAL_TOKEN_HEADER: "not-the-internal-token-000000"},
                               json={})
            if not is_problem(r, 401) or r.json().get("code") != "internal_only":
                offenders.append(describe("user", method, template, r))
    assert offenders == [], "\n".join(offenders)
