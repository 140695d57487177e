"""Mass assignment: fields a caller must never set (`org_id`, `role`, `owner_id`, `is_admin`,
`id`, `user_id`, `password_hash`) are refused with 422 problem+json naming the field, on every
write endpoint, and nothing is stored. And secrets never come back: API key listings have no
`key`, and the secret shown once at creation appears in no later response."""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from workbench.testing import ApiUser, add_member, register, unique

FORBIDDEN_FIELDS = ("org_id", "role", "owner_id", "is_admin", "id", "user_id", "password_hash")
ARGON2_LOOKALIKE = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo"
# What conftest's response hook refuses, checked here by hand where the hook cannot be used.
SECRET_MARKERS = ("password_hash", "secret_hash", "$argon2", "private_pem", "token_hash",
                  "BEGIN ENCRYPTED PRIVATE KEY")


@dataclass
class World:
    platform: Any
    caller: ApiUser
    stranger: ApiUser  # another user with another org: the ids an attacker would inject
    project: dict[str, Any]
    org: dict[str, Any]


@pytest.fixture(scope="module")
def world(platform: Any) -> World:
    with platform.client() as client:
        caller = register(client)
        stranger = register(client)
        project = client.post("/api/v1/projects", headers=caller.headers,
                              json={"name": unique("ma-proj-"), "description": "original"})
        assert project.status_code == 201, project.text
        org = client.get(f"/api/v1/orgs/{caller.org_id}", headers=caller.headers)
        assert org.status_code == 200, org.text
        return World(platform, caller, stranger, project.json(), org.json())


def injected(world: World, field: str) -> Any:
    return {
        "org_id": world.stranger.org_id,
        "role": "owner",
        "owner_id": world.stranger.user_id,
        "is_admin": True,
        "id": str(uuid.uuid4()),
        "user_id": world.stranger.user_id,
        "password_hash": ARGON2_LOOKALIKE,
    }[field]


# ---- one write endpoint each: how to call it, and what must not have been stored -------------

@dataclass
class Endpoint:
    method: str
    path: Callable[[World], str]
    body: Callable[[World, str], dict[str, Any]]  # (world, unique marker) → a valid body
    auth: bool
    nothing_stored: Callable[[World, str], None]
    legitimate: frozenset[str] = frozenset()  # forbidden-list names that are real fields here


def _no_user(w: World, marker: str) -> None:
    assert w.platform.db_rows(f"SELECT id FROM users WHERE username = '{marker}'") == []


def _no_org(w: World, marker: str) -> None:
    assert w.platform.db_rows(f"SELECT id FROM organizations WHERE name = '{marker}'") == []
    rows = w.platform.db_rows(f"SELECT name FROM organizations WHERE slug = '{w.org['slug']}'")
    assert rows == [(w.org["name"],)]


def _no_project(w: World, marker: str) -> None:
    assert w.platform.db_rows(f"SELECT id FROM projects WHERE name = '{marker}'") == []
    rows = w.platform.db_rows("SELECT org_id, owner_id, description FROM projects "
                              f"WHERE name = '{w.project['name']}'")
    assert [(uuid.UUID(str(o)), uuid.UUID(str(u)), d) for o, u, d in rows] == [
        (uuid.UUID(w.caller.org_id), uuid.UUID(w.caller.user_id), "original")]


def _no_membership(w: World, marker: str) -> None:
    rows = w.platform.db_rows(
        "SELECT m.org_id FROM memberships m JOIN users u ON u.id = m.user_id "
        f"WHERE u.email = '{w.stranger.email}'")
    assert [uuid.UUID(str(o)) for (o,) in rows] == [uuid.UUID(w.stranger.org_id)]


def _no_key(w: World, marker: str) -> None:
    assert w.platform.db_rows(f"SELECT id FROM api_keys WHERE name = '{marker}'") == []


ENDPOINTS: dict[str, Endpoint] = {
    "register": Endpoint(
        "POST", lambda w: "/api/v1/auth/register",
        lambda w, m: {"email": f"{m}@example.com", "username": m,
                      "password": "correct horse battery staple"},
        auth=False, nothing_stored=_no_user),
    "org_create": Endpoint(
        "POST", lambda w: "/api/v1/orgs", lambda w, m: {"name": m},
        auth=True, nothing_stored=_no_org),
    "org_update": Endpoint(
        "PATCH", lambda w: f"/api/v1/orgs/{w.caller.org_id}", lambda w, m: {"name": m},
        auth=True, nothing_stored=_no_org),
    "project_create": Endpoint(
        "POST", lambda w: "/api/v1/projects", lambda w, m: {"name": m},
        auth=True, nothing_stored=_no_project),
    "project_update": Endpoint(
        "PATCH", lambda w: f"/api/v1/projects/{w.project['id']}",
        lambda w, m: {"name": m, "description": "changed"},
        auth=True, nothing_stored=_no_project),
    "member_add": Endpoint(
        "POST", lambda w: f"/api/v1/orgs/{w.caller.org_id}/members",
        lambda w, m: {"email": w.stranger.email, "role": "viewer"},
        auth=True, nothing_stored=_no_membership,
        legitimate=frozenset({"role"})),  # the role a new member gets is the point of the call
    "api_key_create": Endpoint(
        "POST", lambda w: "/api/v1/api-keys",
        lambda w, m: {"name": m, "scopes": ["projects:read"]},
        auth=True, nothing_stored=_no_key),
}

CASES = [(e, f) for e, ep in ENDPOINTS.items() for f in FORBIDDEN_FIELDS
         if f not in ep.legitimate]


def assert_no_secrets(r: httpx.Response, refused_field: str) -> None:
    """The conftest hook's check, except that the refused field may be named in the error."""
    text = r.text
    for allowed in (f'"field":"{refused_field}"', f"{refused_field}: "):
        text = text.replace(allowed, "")
    for marker in SECRET_MARKERS:
        assert marker not in text, f"response of {r.request.url} contains {marker!r}"


Refusal = Callable[[str, str], tuple[str, httpx.Response]]


@pytest.fixture(scope="module")
def refusal(world: World) -> Iterator[Refusal]:
    """Sends each (endpoint, field) injection once; both tests of a case read its answer."""
    hooked = world.platform.client()
    # The conftest hook refuses any response containing "password_hash" — which a 422 that
    # names the refused field necessarily does; that case is checked by assert_no_secrets.
    plain = httpx.Client(base_url=world.platform.url, timeout=30.0)
    sent: dict[tuple[str, str], tuple[str, httpx.Response]] = {}

    def call(endpoint: str, field: str) -> tuple[str, httpx.Response]:
        if (endpoint, field) not in sent:
            ep, marker = ENDPOINTS[endpoint], unique("ma")
            body = {**ep.body(world, marker), field: injected(world, field)}
            c = plain if field in SECRET_MARKERS else hooked
            r = c.request(ep.method, ep.path(world), json=body,
                          headers=world.caller.headers if ep.auth else {})
            assert_no_secrets(r, field)
            sent[endpoint, field] = marker, r
        return sent[endpoint, field]

    yield call
    hooked.close()
    plain.close()


def test_every_write_endpoint_is_covered() -> None:
    assert len(CASES) == len(ENDPOINTS) * len(FORBIDDEN_FIELDS) - 1


@pytest.mark.parametrize(("endpoint", "field"), CASES)
def test_forbidden_field_is_refused_with_422_naming_it(
    refusal: Refusal, endpoint: str, field: str,
) -> None:
    _, r = refusal(endpoint, field)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["status"] == 422 and body["code"] == "validation_failed"
    assert field in [e["field"] for e in body["errors"]], body
    assert ARGON2_LOOKALIKE not in r.text


@pytest.mark.parametrize(("endpoint", "field"), CASES)
def test_forbidden_field_stores_nothing(
    world: World, refusal: Refusal, endpoint: str, field: str,
) -> None:
    marker, _ = refusal(endpoint, field)
    ENDPOINTS[endpoint].nothing_stored(world, marker)


def test_member_role_field_is_accepted_by_member_add(world: World) -> None:
    """`role` is refused everywhere else, but is the legitimate input of adding a member."""
    with world.platform.client() as client:
        newcomer = register(client)
        r = client.post(f"/api/v1/orgs/{world.caller.org_id}/members",
                        headers=world.caller.headers,
                        json={"email": newcomer.email, "role": "viewer"})
        assert r.status_code == 201, r.text
        assert (r.json()["user_id"], r.json()["role"]) == (newcomer.user_id, "viewer")


def test_project_stays_owned_by_the_caller_after_injection_attempts(world: World) -> None:
    with world.platform.client() as client:
        for field in ("org_id", "owner_id", "id"):
            r = client.patch(f"/api/v1/projects/{world.project['id']}",
                             headers=world.caller.headers,
                             json={field: injected(world, field)})
            assert r.status_code == 422, r.text
        r = client.get(f"/api/v1/projects/{world.project['id']}", headers=world.caller.headers)
    assert r.status_code == 200, r.text
    got = r.json()
    assert (got["id"], got["org_id"], got["owner_id"]) == (
        world.project["id"], world.caller.org_id, world.caller.user_id)


# ---- secrets ---------------------------------------------------------------------------------

def test_api_key_list_and_get_have_no_key_field(platform: Any, client: httpx.Client) -> None:
    user = register(client)
    created = client.post("/api/v1/api-keys", headers=user.headers,
                          json={"name": unique("k-"), "scopes": ["projects:read"]})
    assert created.status_code == 201, created.text
    assert created.json()["key"].startswith("wbk_")
    listed = client.get("/api/v1/api-keys", headers=user.headers)
    assert listed.status_code == 200, listed.text
    items = listed.json()["items"]
    assert [k["id"] for k in items] == [created.json()["id"]]
    assert all("key" not in k for k in items)
    one = client.get(f"/api/v1/api-keys/{created.json()['id']}", headers=user.headers)
    assert one.status_code == 200, one.text
    assert "key" not in one.json()
    assert one.json()["prefix"] == created.json()["prefix"]


def test_api_key_secret_appears_in_no_later_response(platform: Any) -> None:
    seen: list[httpx.Response] = []

    def record(r: httpx.Response) -> None:
        r.read()
        seen.append(r)

    with platform.client() as client:
        client.event_hooks = {"response": [*client.event_hooks["response"], record]}
        user = register(client)
        member = add_member(client, user, "member")
        created = client.post("/api/v1/api-keys", headers=user.headers,
                              json={"name": unique("k-"), "scopes": ["projects:read",
                                                                     "projects:write"]})
        assert created.status_code == 201, created.text
        key = created.json()["key"]
        secret = key.split("_", 2)[2]
        key_id = created.json()["id"]
        start = len(seen)

        by_key = {"x-api-key": key}
        bearer_key = {"authorization": f"Bearer {key}"}
        calls = [
            ("GET", "/api/v1/api-keys", user.headers, None),
            ("GET", f"/api/v1/api-keys/{key_id}", user.headers, None),
            ("GET", "/api/v1/auth/me", by_key, None),
            ("GET", "/api/v1/auth/me", bearer_key, None),
            ("POST", "/api/v1/projects", by_key, {"name": unique("via-key-")}),
            ("GET", "/api/v1/projects", by_key, None),
            ("GET", "/api/v1/api-keys", by_key, None),  # scope lacks api_keys:read: refused
            ("GET", "/api/v1/orgs", user.headers, None),
            ("GET", f"/api/v1/orgs/{user.org_id}/members", user.headers, None),
            ("GET", "/api/v1/api-keys", member.headers, None),
            ("DELETE", f"/api/v1/api-keys/{key_id}", user.headers, None),
            ("GET", f"/api/v1/api-keys/{key_id}", user.headers, None),
            ("GET", "/api/v1/auth/me", by_key, None),  # revoked now
            ("POST", "/api/v1/auth/login", {}, {"email": user.email, "password": user.password}),
            ("GET", "/.well-known/jwks.json", {}, None),
        ]
        statuses = []
        for method, path, headers, body in calls:
            statuses.append(client.request(method, path, headers=headers, json=body).status_code)
    assert statuses[2:5] == [200, 200, 201], statuses
    assert statuses[6] == 403 and statuses[10] == 204, statuses
    later = seen[start:]
    assert len(later) == len(calls)
    digest = hashlib.sha256(secret.encode()).digest()
    needles = [key, secret, digest.hex(), base64.b64encode(digest).decode(),
               base64.urlsafe_b64encode(digest).decode().rstrip("=")]
    leaks = [f"{r.request.method} {r.request.url.path} -> {n[:12]}…"
             for r in later for n in needles
             if n in r.text or any(n in v for v in r.headers.values())]
    assert leaks == [], "\n".join(leaks)
    revoked = [r for r in later if r.request.url.path == f"/api/v1/api-keys/{key_id}"][-1]
    assert revoked.json()["revoked_at"] is not None and "key" not in revoked.json()


def test_no_stored_password_hash_appears_in_account_responses(
    platform: Any, client: httpx.Client,
) -> None:
    user = register(client)
    [(stored,)] = platform.db_rows(
        f"SELECT password_hash FROM users WHERE email = '{user.email}'")
    assert stored.startswith("$argon2")
    responses = [
        client.get("/api/v1/auth/me", headers=user.headers),
        client.get(f"/api/v1/orgs/{user.org_id}/members", headers=user.headers),
        client.post("/api/v1/auth/login", json={"email": user.email, "password": user.password}),
    ]
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert all(stored not in r.text for r in responses)
    assert responses[0].json()["user"]["email"] == user.email
    assert set(responses[0].json()["user"]) == {"id", "email", "username", "display_name",
                                                "created_at"}
