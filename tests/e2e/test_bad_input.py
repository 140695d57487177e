"""Bad input through the gateway, in both run modes: every refusal is an RFC 9457 problem with a
stable code, the request id in header and body, and nothing of the server's insides."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from workbench.testing import ApiUser, register, unique

MAX_BODY = 1_048_576  # WB_MAX_BODY_BYTES default
PROBLEM_KEYS = {"type", "title", "status", "detail", "code", "request_id"}
# A traceback line, a Python source file, or an absolute path into the install.
LEAK = re.compile(r'Traceback|File "|\.py\b|site-packages|/usr/(?:local/)?lib/|/work/|/home/'
                  r'|/root/|/tmp/')


def assert_problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The error contract every refusal keeps; returns the body."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].split(";")[0].strip() == "application/problem+json", (
        r.headers["content-type"])
    body: dict[str, Any] = r.json()
    assert PROBLEM_KEYS <= body.keys(), body
    assert body["status"] == status
    assert body["code"] == code, body
    assert body["type"] == f"/problems/{code}"
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    assert body["request_id"]
    assert set(r.headers.get_list("x-request-id")) == {body["request_id"]}, (
        r.headers.get_list("x-request-id"), body["request_id"])
    leak = LEAK.search(r.text)
    assert leak is None, f"error body reveals server internals ({leak.group()!r}): {r.text}"
    return body


@pytest.fixture
def user(client: httpx.Client) -> ApiUser:
    return register(client)


def json_headers(user: ApiUser | None = None) -> dict[str, str]:
    headers = {"content-type": "application/json"}
    if user is not None:
        headers.update(user.headers)
    return headers


def chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    """A body of `total` bytes sent with Transfer-Encoding: chunked (no content-length)."""
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        yield b" " * n
        sent += n


def still_serves(client: httpx.Client, user: ApiUser) -> None:
    me = client.get("/api/v1/auth/me", headers=user.headers)
    assert me.status_code == 200, me.text
    assert me.json()["user"]["id"] == user.user_id
    created = client.post("/api/v1/projects", json={"name": unique("After ")},
                          headers=user.headers)
    assert created.status_code == 201, created.text


# ---- malformed and mistyped bodies ----------------------------------------------------------

@pytest.mark.parametrize("body", [b'{"email": ', b"{'email': 'single quotes'}", b"not json",
                                  b'{"email": "a@example.com",}'])
def test_malformed_json_is_400_malformed_json(client: httpx.Client, body: bytes) -> None:
    r = client.post("/api/v1/auth/login", content=body, headers=json_headers())

    problem = assert_problem(r, 400, "malformed_json")
    assert problem["title"] == "Malformed JSON"
    assert "not valid JSON" in problem["detail"]


def test_malformed_json_on_an_authenticated_route_is_400(client: httpx.Client,
                                                         user: ApiUser) -> None:
    r = client.post("/api/v1/projects", content=b'{"name": "x"', headers=json_headers(user))

    assert_problem(r, 400, "malformed_json")
    assert client.get("/api/v1/projects", headers=user.headers).json()["items"] == []


def test_wrong_type_is_422_naming_the_field(client: httpx.Client) -> None:
    name = unique("user")
    r = client.post("/api/v1/auth/register",
                    json={"email": 5, "username": name, "password": "long enough password"})

    problem = assert_problem(r, 422, "validation_failed")
    assert [e["field"] for e in problem["errors"]] == ["email"]
    assert problem["errors"][0]["type"] == "string_type"
    assert problem["errors"][0]["message"]
    assert "email" in problem["detail"]
    # Nothing was registered.
    login = client.post("/api/v1/auth/login", json={"email": name,
                                                    "password": "long enough password"})
    assert login.status_code == 401


def test_wrong_nested_type_is_422_naming_the_dotted_field(client: httpx.Client,
                                                          user: ApiUser) -> None:
    r = client.post("/api/v1/api-keys", json={"name": "k", "scopes": ["projects:read", 7]},
                    headers=user.headers)

    problem = assert_problem(r, 422, "validation_failed")
    assert [e["field"] for e in problem["errors"]] == ["scopes.1"]
    assert "scopes.1" in problem["detail"]


def test_every_invalid_field_is_named(client: httpx.Client) -> None:
    r = client.post("/api/v1/auth/register",
                    json={"email": "not-an-email", "username": "X", "password": "short"})

    problem = assert_problem(r, 422, "validation_failed")
    assert {e["field"] for e in problem["errors"]} == {"email", "username", "password"}
    for field in ("email", "username", "password"):
        assert field in problem["detail"]


def test_unknown_field_is_422(client: httpx.Client, user: ApiUser) -> None:
    r = client.post("/api/v1/projects",
                    json={"name": unique("P "), "owner_id": str(uuid.uuid4())},
                    headers=user.headers)

    problem = assert_problem(r, 422, "validation_failed")
    assert [(e["field"], e["type"]) for e in problem["errors"]] == [("owner_id", "extra_forbidden")]
    assert "owner_id" in problem["detail"]
    assert client.get("/api/v1/projects", headers=user.headers).json()["items"] == []


def test_missing_required_field_is_422(client: httpx.Client) -> None:
    r = client.post("/api/v1/auth/login", json={"email": "someone@example.com"})

    problem = assert_problem(r, 422, "validation_failed")
    assert [(e["field"], e["type"]) for e in problem["errors"]] == [("password", "missing")]
    assert "password" in problem["detail"]


def test_missing_body_is_422(client: httpx.Client, user: ApiUser) -> None:
    r = client.post("/api/v1/projects", headers=user.headers)

    problem = assert_problem(r, 422, "validation_failed")
    assert [(e["field"], e["type"]) for e in problem["errors"]] == [("body", "missing")]


def test_json_array_instead_of_object_is_422(client: httpx.Client, user: ApiUser) -> None:
    r = client.post("/api/v1/projects", json=[{"name": "x"}], headers=user.headers)

    problem = assert_problem(r, 422, "validation_failed")
    assert problem["errors"][0]["field"] == "body"


# ---- paths, routes and methods --------------------------------------------------------------

@pytest.mark.parametrize(("method", "path", "field"), [
    ("GET", "/api/v1/projects/not-a-uuid", "project_id"),
    ("DELETE", "/api/v1/api-keys/12345", "key_id"),
    ("GET", "/api/v1/orgs/%27%3B--/members", "org_id"),
])
def test_invalid_uuid_in_path_is_422(client: httpx.Client, user: ApiUser, method: str,
                                     path: str, field: str) -> None:
    r = client.request(method, path, headers=user.headers)

    problem = assert_problem(r, 422, "validation_failed")
    fields = [e["field"] for e in problem["errors"]]
    assert fields == [f"path.{field}"]
    assert problem["errors"][0]["type"] == "uuid_parsing"
    assert field in problem["detail"]


@pytest.mark.parametrize("path", [
    "/api/v1/no-such-thing",        # no service: answered by the gateway itself
    "/no-such-thing",
    "/api/v1/projects/{uuid}/no-such-thing",  # under a service prefix: answered by it
    "/api/v1/auth/no-such-thing",
])
def test_unknown_route_is_404_problem(client: httpx.Client, user: ApiUser, path: str) -> None:
    r = client.get(path.format(uuid=uuid.uuid4()), headers=user.headers)

    problem = assert_problem(r, 404, "not_found")
    assert problem["title"] == "Not found"
    assert "/docs" in problem["detail"]


@pytest.mark.parametrize(("method", "path"), [
    ("PUT", "/api/v1/projects"),
    ("DELETE", "/api/v1/auth/me"),
    ("POST", "/healthz"),  # a gateway route
])
def test_wrong_method_is_405_problem(client: httpx.Client, user: ApiUser, method: str,
                                     path: str) -> None:
    r = client.request(method, path, headers=user.headers)

    problem = assert_problem(r, 405, "method_not_allowed")
    assert problem["title"] == "Method not allowed"
    assert r.headers.get("allow")


def test_405_allow_header_lists_every_method_of_the_path(client: httpx.Client,
                                                         user: ApiUser) -> None:
    r = client.put("/api/v1/projects", headers=user.headers)

    assert r.status_code == 405
    allowed = {m.strip() for m in r.headers["allow"].split(",")}
    assert {"GET", "POST"} <= allowed, r.headers["allow"]


def test_missing_credentials_is_401_problem(client: httpx.Client) -> None:
    r = client.get("/api/v1/projects")

    problem = assert_problem(r, 401, "unauthorized")
    assert "Bearer" in problem["detail"]
    assert r.headers["www-authenticate"].startswith("Bearer")


# ---- body size ------------------------------------------------------------------------------

def test_body_over_limit_with_content_length_is_413(client: httpx.Client,
                                                    user: ApiUser) -> None:
    r = client.post("/api/v1/projects", content=b" " * (MAX_BODY + 1),
                    headers=json_headers(user))

    problem = assert_problem(r, 413, "payload_too_large")
    assert str(MAX_BODY) in problem["detail"]
    assert client.get("/api/v1/projects", headers=user.headers).json()["items"] == []


def test_body_over_limit_on_a_public_route_is_413(client: httpx.Client) -> None:
    r = client.post("/api/v1/auth/login", content=b" " * (2 * MAX_BODY),
                    headers=json_headers())

    assert_problem(r, 413, "payload_too_large")


def test_chunked_body_over_limit_is_413(client: httpx.Client, user: ApiUser) -> None:
    r = client.post("/api/v1/projects", content=chunks(MAX_BODY + 1),
                    headers=json_headers(user))

    assert "content-length" not in r.request.headers
    assert r.request.headers["transfer-encoding"] == "chunked"
    problem = assert_problem(r, 413, "payload_too_large")
    assert str(MAX_BODY) in problem["detail"]
    assert client.get("/api/v1/projects", headers=user.headers).json()["items"] == []


def test_chunked_body_over_limit_on_a_public_route_is_413(client: httpx.Client) -> None:
    r = client.post("/api/v1/auth/register", content=chunks(3 * MAX_BODY),
                    headers=json_headers())

    assert_problem(r, 413, "payload_too_large")


def test_platform_keeps_serving_after_oversized_bodies(client: httpx.Client,
                                                       user: ApiUser) -> None:
    for content in (b" " * (MAX_BODY + 1), chunks(2 * MAX_BODY)):
        r = client.post("/api/v1/projects", content=content, headers=json_headers(user))
        assert r.status_code == 413
        still_serves(client, user)
    with httpx.Client(base_url=str(client.base_url), timeout=30) as fresh:
        still_serves(fresh, user)


def test_body_just_under_the_limit_is_accepted(client: httpx.Client, user: ApiUser) -> None:
    payload = {"name": unique("Big "), "settings": {"blob": ""}}
    overhead = len(json.dumps(payload).encode())
    payload["settings"]["blob"] = "x" * (MAX_BODY - overhead)
    body = json.dumps(payload).encode()
    assert len(body) == MAX_BODY

    r = client.post("/api/v1/projects", content=body, headers=json_headers(user))

    assert r.status_code == 201, r.text[:500]
    assert len(r.json()["settings"]["blob"]) == MAX_BODY - overhead


# ---- request ids ----------------------------------------------------------------------------

def test_error_carries_the_callers_request_id(client: httpx.Client) -> None:
    rid = f"client-{uuid.uuid4().hex[:12]}"

    r = client.post("/api/v1/auth/login", json={"email": "x@example.com"},
                    headers={"x-request-id": rid})

    problem = assert_problem(r, 422, "validation_failed")
    assert problem["request_id"] == rid


def test_unsafe_request_id_is_replaced(client: httpx.Client) -> None:
    r = client.post("/api/v1/auth/login", json={"email": "x@example.com"},
                    headers={"x-request-id": "<script>alert(1)</script>"})

    problem = assert_problem(r, 422, "validation_failed")
    assert re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", problem["request_id"])
    assert "script" not in r.text


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/api/v1/auth/login", {"email": "x@example.com"}),   # 422 from the service
    ("GET", "/api/v1/projects/not-a-uuid", None),                  # 422 from the service
    ("PUT", "/api/v1/projects", None),                             # 405 from the service
    ("GET", "/api/v1/no-such-thing", None),                        # 404 from the gateway
])
def test_error_response_has_exactly_one_request_id_header(
    client: httpx.Client, user: ApiUser, method: str, path: str, body: Any,
) -> None:
    r = client.request(method, path, json=body, headers=user.headers)

    assert r.status_code >= 400
    assert r.headers.get_list("x-request-id") == [r.json()["request_id"]]
