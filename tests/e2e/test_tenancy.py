"""Tenant isolation: an owner of one org, calling every user-service route that takes an id with
another org's ids (org, member, project, API key), gets 404 problem+json — never 403, never the
other org's data — and the other org's data stays as it was.

The table of id routes is checked against the routes enumerated from the user service's routers,
so a new route with an id fails here until it is added to the table."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute, Mount, Route

from services.cli import SERVICES
from workbench.testing import ApiUser, add_member, register, unique

PARAM = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")


@dataclass
class Ids:
    victim_org: str
    victim_member: str
    victim_owner: str
    victim_project: str
    victim_key: str
    attacker_org: str


# (method, path template) → cases: (path params, JSON body or None).
Case = tuple[dict[str, str], dict[str, Any] | None]


def cases(ids: Ids, attacker: ApiUser) -> dict[tuple[str, str], list[Case]]:
    org, member = ids.victim_org, ids.victim_member
    return {
        ("GET", "/api/v1/orgs/{org_id}"): [({"org_id": org}, None)],
        ("PATCH", "/api/v1/orgs/{org_id}"): [({"org_id": org}, {"name": "pwned-org"})],
        ("DELETE", "/api/v1/orgs/{org_id}"): [({"org_id": org}, None)],
        ("GET", "/api/v1/orgs/{org_id}/members"): [({"org_id": org}, None)],
        ("POST", "/api/v1/orgs/{org_id}/members"): [
            ({"org_id": org}, {"email": attacker.email, "role": "owner"})],
        ("GET", "/api/v1/orgs/{org_id}/quotas"): [({"org_id": org}, None)],
        ("PATCH", "/api/v1/orgs/{org_id}/members/{user_id}"): [
            ({"org_id": org, "user_id": member}, {"role": "viewer"}),
            ({"org_id": org, "user_id": ids.victim_owner}, {"role": "viewer"}),
            # the victim's member id under the attacker's own org
            ({"org_id": ids.attacker_org, "user_id": member}, {"role": "viewer"}),
        ],
        ("DELETE", "/api/v1/orgs/{org_id}/members/{user_id}"): [
            ({"org_id": org, "user_id": member}, None),
            ({"org_id": org, "user_id": ids.victim_owner}, None),
            ({"org_id": ids.attacker_org, "user_id": member}, None),
        ],
        ("GET", "/api/v1/projects/{project_id}"): [({"project_id": ids.victim_project}, None)],
        ("PATCH", "/api/v1/projects/{project_id}"): [
            ({"project_id": ids.victim_project}, {"name": "pwned-project"})],
        ("DELETE", "/api/v1/projects/{project_id}"): [
            ({"project_id": ids.victim_project}, None)],
        ("GET", "/api/v1/api-keys/{key_id}"): [({"key_id": ids.victim_key}, None)],
        ("DELETE", "/api/v1/api-keys/{key_id}"): [({"key_id": ids.victim_key}, None)],
    }


# Routes with an id that are not tenant routes, and why.
EXEMPT: dict[tuple[str, str], str] = {
    ("PUT", "/internal/v1/orgs/{org_id}/quotas"):
        "operator route behind the internal token (never routed by the gateway); "
        "see test_inventory",
    ("GET", "/internal/v1/orgs/{org_id}/quotas/{resource}"):
        "service-to-service quota read behind the internal token (never routed by the "
        "gateway); see test_inventory",
    ("GET", "/internal/v1/orgs/{org_id}/projects/{project_id}"):
        "service-to-service lookup behind the internal token (never routed by the gateway); "
        "it answers only whether the project is the named org's; see test_inventory",
}


def walk_routes(routes: Sequence[BaseRoute], prefix: str = "") -> Iterator[tuple[str, str]]:
    for route in routes:
        if isinstance(route, APIRoute | Route):
            for method in sorted(route.methods or ()):
                yield method, prefix + route.path
        elif isinstance(route, Mount):
            yield from walk_routes(route.routes, prefix + route.path)
        elif hasattr(route, "original_router") and hasattr(route, "include_context"):
            yield from walk_routes(route.original_router.routes,
                                   prefix + route.include_context.prefix)
        else:
            raise AssertionError(f"unknown route kind {type(route).__name__}: teach walk_routes")


def user_routes_with_ids() -> set[tuple[str, str]]:
    spec = SERVICES["user"]
    app: FastAPI = spec.load().create_app(spec.make_settings())
    return {(m, p) for m, p in walk_routes(app.routes) if PARAM.search(p)}


def fill(template: str, params: dict[str, str]) -> str:
    names = PARAM.findall(template)
    assert set(names) == set(params), f"{template}: params {sorted(params)}"
    return PARAM.sub(lambda m: params[m.group(1)], template)


def test_tenancy_table_covers_every_user_route_with_an_id() -> None:
    dummy = Ids(*(str(uuid.uuid4()) for _ in range(6)))
    attacker = ApiUser("a@example.com", "a", "p", "u", "o", "t", "r")
    table = set(cases(dummy, attacker))
    routes = user_routes_with_ids()
    assert sorted(routes - table - set(EXEMPT)) == [], "id routes missing from the table"
    assert sorted((table | set(EXEMPT)) - routes) == [], "table names routes that do not exist"
    for (_, template), route_cases in cases(dummy, attacker).items():
        for params, _ in route_cases:
            fill(template, params)  # every case fills exactly the template's params


# ---- the attack ------------------------------------------------------------------------------

@dataclass
class Attack:
    platform: Any
    victim: ApiUser
    member: ApiUser
    attacker: ApiUser
    ids: Ids
    org_before: dict[str, Any]
    project_before: dict[str, Any]
    key_before: dict[str, Any]
    members_before: list[tuple[str, str]]
    victim_key_secret: str
    victim_markers: list[str]
    # (credential kind, method, template, path, response)
    responses: list[tuple[str, str, str, str, httpx.Response]] = field(default_factory=list)


def same_instant(d: dict[str, Any]) -> dict[str, Any]:
    """Timestamps as instants: embedded mode (SQLite) reads them back without the zone it
    wrote them with, which is a format difference, not a change of the data."""
    out = dict(d)
    for k, v in d.items():
        if k.endswith("_at") and isinstance(v, str):
            t = datetime.fromisoformat(v)
            out[k] = t if t.tzinfo else t.replace(tzinfo=UTC)
    return out


def members_of(client: httpx.Client, user: ApiUser) -> list[tuple[str, str]]:
    r = client.get(f"/api/v1/orgs/{user.org_id}/members", headers=user.headers)
    assert r.status_code == 200, r.text
    return sorted((m["user_id"], m["role"]) for m in r.json()["items"])


@pytest.fixture(scope="module")
def attack(platform: Any) -> Attack:
    with platform.client() as client:
        victim = register(client)
        member = add_member(client, victim, "member")
        attacker = register(client)  # owner of their own org: every permission there

        org = client.get(f"/api/v1/orgs/{victim.org_id}", headers=victim.headers)
        assert org.status_code == 200, org.text
        project = client.post("/api/v1/projects", headers=victim.headers,
                              json={"name": unique("secret-project-"),
                                    "description": unique("confidential-")})
        assert project.status_code == 201, project.text
        key = client.post("/api/v1/api-keys", headers=victim.headers,
                          json={"name": unique("victim-key-"), "scopes": ["projects:read"]})
        assert key.status_code == 201, key.text
        key_body = key.json()
        secret = key_body.pop("key")
        ids = Ids(victim_org=victim.org_id, victim_member=member.user_id,
                  victim_owner=victim.user_id, victim_project=project.json()["id"],
                  victim_key=key_body["id"], attacker_org=attacker.org_id)

        # The attacker also holds an API key with every permission of their role.
        perms = client.get("/api/v1/auth/me", headers=attacker.headers).json()["permissions"]
        attacker_key = client.post("/api/v1/api-keys", headers=attacker.headers,
                                   json={"name": "attacker", "scopes": perms})
        assert attacker_key.status_code == 201, attacker_key.text
        credentials = {"bearer": attacker.headers,
                       "api_key": {"x-api-key": attacker_key.json()["key"]}}

        a = Attack(platform, victim, member, attacker, ids, org.json(), project.json(),
                   key_body, members_of(client, victim), secret,
                   victim_markers=[org.json()["name"], org.json()["slug"],
                                   project.json()["name"], project.json()["description"],
                                   key_body["name"], key_body["prefix"], member.email,
                                   victim.email])
        for kind, headers in credentials.items():
            for (method, template), route_cases in cases(ids, attacker).items():
                for params, body in route_cases:
                    path = fill(template, params)
                    r = client.request(method, path, headers=headers, json=body)
                    a.responses.append((kind, method, template, path, r))
        return a


def test_every_id_route_answers_404_problem_for_another_orgs_ids(attack: Attack) -> None:
    offenders = []
    for kind, method, _, path, r in attack.responses:
        body = r.json() if r.headers.get("content-type", "").startswith(
            "application/problem+json") else None
        if r.status_code != 404 or body is None or body.get("status") != 404:
            offenders.append(f"{kind} {method} {path} -> {r.status_code} {r.text[:200]}")
    assert offenders == [], "\n".join(offenders)
    assert len(attack.responses) >= 2 * 13


def test_no_cross_tenant_response_contains_the_victims_data(attack: Attack) -> None:
    leaks = [f"{kind} {method} {path} contains {marker!r}"
             for kind, method, _, path, r in attack.responses
             for marker in [*attack.victim_markers, attack.victim_key_secret]
             if marker and marker in r.text]
    assert leaks == [], "\n".join(leaks)


def test_victims_org_is_unchanged_after_cross_tenant_calls(attack: Attack) -> None:
    with attack.platform.client() as client:
        r = client.get(f"/api/v1/orgs/{attack.victim.org_id}", headers=attack.victim.headers)
    assert r.status_code == 200, r.text
    assert same_instant(r.json()) == same_instant(attack.org_before)
    rows = attack.platform.db_rows(
        f"SELECT name, id FROM organizations WHERE slug = '{attack.org_before['slug']}'")
    assert [(name, uuid.UUID(str(i))) for name, i in rows] == [
        (attack.org_before["name"], uuid.UUID(attack.victim.org_id))]
    assert attack.platform.db_rows(
        "SELECT id FROM organizations WHERE name = 'pwned-org'") == []


def test_victims_project_is_unchanged_after_cross_tenant_calls(attack: Attack) -> None:
    with attack.platform.client() as client:
        r = client.get(f"/api/v1/projects/{attack.ids.victim_project}",
                       headers=attack.victim.headers)
    assert r.status_code == 200, r.text
    assert same_instant(r.json()) == same_instant(attack.project_before)
    rows = attack.platform.db_rows(
        f"SELECT org_id, owner_id FROM projects WHERE name = '{attack.project_before['name']}'")
    assert [(uuid.UUID(str(o)), uuid.UUID(str(w))) for o, w in rows] == [
        (uuid.UUID(attack.victim.org_id), uuid.UUID(attack.victim.user_id))]
    assert attack.platform.db_rows(
        "SELECT id FROM projects WHERE name = 'pwned-project'") == []


def test_victims_api_key_is_not_revoked_after_cross_tenant_calls(attack: Attack) -> None:
    with attack.platform.client() as client:
        r = client.get(f"/api/v1/api-keys/{attack.ids.victim_key}",
                       headers=attack.victim.headers)
        assert r.status_code == 200, r.text
        after = r.json()
        assert after["revoked_at"] is None
        assert same_instant({**after, "last_used_at": None}) == same_instant(
            {**attack.key_before, "last_used_at": None})
        me = client.get("/api/v1/auth/me", headers={"x-api-key": attack.victim_key_secret})
        assert me.status_code == 200, me.text
        assert me.json()["org"]["id"] == attack.victim.org_id
    rows = attack.platform.db_rows(
        f"SELECT revoked_at FROM api_keys WHERE name = '{attack.key_before['name']}'")
    assert rows == [(None,)]


def test_victims_members_are_unchanged_after_cross_tenant_calls(attack: Attack) -> None:
    with attack.platform.client() as client:
        assert members_of(client, attack.victim) == attack.members_before
    assert attack.members_before == sorted([(attack.victim.user_id, "owner"),
                                            (attack.member.user_id, "member")])
    # The attacker belongs to their own org only.
    rows = attack.platform.db_rows(
        "SELECT m.org_id, m.role FROM memberships m JOIN users u ON u.id = m.user_id "
        f"WHERE u.email = '{attack.attacker.email}'")
    assert [(uuid.UUID(str(o)), r) for o, r in rows] == [
        (uuid.UUID(attack.attacker.org_id), "owner")]
