"""Platform API keys through the gateway, in both run modes: scopes narrow what a key may do,
keys are exchanged at the edge for short-lived tokens (cached), revocation reaches the cache at
once, expiry and bad keys are refused, and the secret is never stored."""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from workbench.testing import ApiUser, add_member, register, unique

if TYPE_CHECKING:
    from conftest import Platform

REVOCATION_DEADLINE_S = 3.0


def create_key(client: httpx.Client, user: ApiUser, scopes: list[str],
               **extra: Any) -> dict[str, Any]:
    r = client.post("/api/v1/api-keys", json={"name": unique("key"), "scopes": scopes, **extra},
                    headers=user.headers)
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def split_key(key: str) -> tuple[str, str]:
    """(public id, secret) of `wbk_<16 char id>_<secret>`."""
    prefix, public_id, secret = key.split("_", 2)
    assert prefix == "wbk" and len(public_id) == 16 and secret, key
    return public_id, secret


def key_auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def create_project(client: httpx.Client, user: ApiUser) -> dict[str, Any]:
    r = client.post("/api/v1/projects", json={"name": unique("Project ")}, headers=user.headers)
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def assert_401(r: httpx.Response, code: str) -> dict[str, Any]:
    assert r.status_code == 401, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    assert body["status"] == 401
    assert body["code"] == code, body
    assert body["type"] == f"/problems/{code}"
    assert body["request_id"]
    return body


def parse_time(value: str) -> datetime:
    """An API timestamp; a missing offset is read as UTC (that it is present is tested apart)."""
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def has_utc_offset(value: str) -> bool:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).utcoffset() == timedelta(0)


def row_text(row: tuple[Any, ...]) -> str:
    """Every column of a row as text; binary columns both as hex and as raw characters."""
    parts: list[str] = []
    for value in row:
        if isinstance(value, bytes | bytearray | memoryview):
            raw = bytes(value)
            parts += [raw.hex(), raw.decode("latin-1")]
        else:
            parts.append(str(value))
    return "\x00".join(parts)


# ---- using a key ----------------------------------------------------------------------------

def test_read_scoped_key_lists_projects_as_bearer_token(client: httpx.Client) -> None:
    owner = register(client)
    project = create_project(client, owner)
    key = create_key(client, owner, ["projects:read"])["key"]

    r = client.get("/api/v1/projects", headers=key_auth(key))

    assert r.status_code == 200, r.text
    assert [p["id"] for p in r.json()["items"]] == [project["id"]]
    assert r.json()["items"][0]["org_id"] == owner.org_id


def test_read_scoped_key_lists_projects_as_x_api_key_header(client: httpx.Client) -> None:
    owner = register(client)
    project = create_project(client, owner)
    key = create_key(client, owner, ["projects:read"])["key"]

    r = client.get("/api/v1/projects", headers={"x-api-key": key})

    assert r.status_code == 200, r.text
    assert [p["id"] for p in r.json()["items"]] == [project["id"]]


def test_read_scoped_key_cannot_create_a_project(client: httpx.Client) -> None:
    owner = register(client)
    key = create_key(client, owner, ["projects:read"])["key"]

    for headers in (key_auth(key), {"x-api-key": key}):
        r = client.post("/api/v1/projects", json={"name": unique("Sneaky ")}, headers=headers)
        assert r.status_code == 403, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        body = r.json()
        assert body["code"] == "permission_denied"
        assert body["permission"] == "projects:write"
        assert "projects:write" in body["detail"]

    listed = client.get("/api/v1/projects", headers=owner.headers).json()
    assert listed["items"] == []  # nothing was created


def test_key_principal_carries_only_the_key_scopes(client: httpx.Client) -> None:
    owner = register(client)
    key = create_key(client, owner, ["projects:read", "org:read"])["key"]

    r = client.get("/api/v1/auth/me", headers=key_auth(key))

    # /me itself needs no permission; what the key may do is its scopes, not the owner's role.
    assert r.status_code == 200, r.text
    me = r.json()
    assert me["user"]["id"] == owner.user_id
    assert me["role"] == "owner"
    assert me["scopes"] == ["org:read", "projects:read"]
    assert me["permissions"] == ["org:read", "projects:read"]


# ---- creating a key: scopes -----------------------------------------------------------------

def test_member_cannot_create_a_key_with_an_admin_scope(client: httpx.Client) -> None:
    owner = register(client)
    member = add_member(client, owner, "member")

    r = client.post("/api/v1/api-keys", json={"name": "too much",
                                              "scopes": ["projects:write", "members:write"]},
                    headers=member.headers)

    assert r.status_code == 403, r.text
    body = r.json()
    assert body["code"] == "scope_exceeds_role"
    assert "members:write" in body["detail"]
    assert "projects:write" not in body["detail"]  # only the scope beyond the role is named
    keys = client.get("/api/v1/api-keys", headers=member.headers).json()["items"]
    assert keys == []


def test_viewer_cannot_create_a_key_with_a_write_scope(client: httpx.Client) -> None:
    owner = register(client)
    viewer = add_member(client, owner, "viewer")

    r = client.post("/api/v1/api-keys", json={"name": "viewer key",
                                              "scopes": ["projects:write"]},
                    headers=viewer.headers)

    assert r.status_code == 403, r.text
    body = r.json()
    assert body["code"] == "scope_exceeds_role"
    assert "projects:write" in body["detail"]
    owner_view = client.get("/api/v1/api-keys", headers=owner.headers).json()["items"]
    assert owner_view == []
    # A read-only key is what a viewer may have.
    ok = client.post("/api/v1/api-keys", json={"name": "dashboard", "scopes": ["projects:read"]},
                     headers=viewer.headers)
    assert ok.status_code == 201, ok.text


def test_key_cannot_mint_a_key_broader_than_its_own_scopes(client: httpx.Client) -> None:
    owner = register(client)
    key = create_key(client, owner, ["api_keys:write", "projects:read"])["key"]

    r = client.post("/api/v1/api-keys", json={"name": "escalate",
                                              "scopes": ["projects:write"]},
                    headers=key_auth(key))

    assert r.status_code == 403, r.text
    assert r.json()["code"] == "scope_exceeds_role"
    assert "projects:write" in r.json()["detail"]


def test_unknown_scope_is_refused(client: httpx.Client) -> None:
    owner = register(client)

    r = client.post("/api/v1/api-keys", json={"name": "unknown",
                                              "scopes": ["projects:read", "rockets:launch"]},
                    headers=owner.headers)

    assert r.status_code == 422, r.text
    body = r.json()
    assert body["code"] == "unknown_scope"
    assert body["errors"][0]["field"] == "scopes"
    assert "rockets:launch" in body["detail"]
    assert client.get("/api/v1/api-keys", headers=owner.headers).json()["items"] == []


def test_malformed_scope_string_is_a_validation_error(client: httpx.Client) -> None:
    owner = register(client)

    r = client.post("/api/v1/api-keys", json={"name": "bad", "scopes": ["Projects Read"]},
                    headers=owner.headers)

    assert r.status_code == 422, r.text
    assert r.json()["code"] == "validation_failed"
    assert [e["field"] for e in r.json()["errors"]] == ["scopes.0"]


def test_created_key_is_shown_once_with_its_prefix_and_scopes(client: httpx.Client) -> None:
    owner = register(client)

    created = create_key(client, owner, ["projects:read", "projects:read", "data:read"],
                         expires_in_days=30)

    public_id, _ = split_key(created["key"])
    assert created["prefix"] == f"wbk_{public_id}"
    assert created["scopes"] == ["data:read", "projects:read"]  # deduplicated, sorted
    assert created["user_id"] == owner.user_id
    assert created["revoked_at"] is None and created["last_used_at"] is None
    expires = parse_time(created["expires_at"]) - parse_time(created["created_at"])
    assert timedelta(days=30) - timedelta(minutes=1) < expires < timedelta(days=30, minutes=1)


# ---- revocation, expiry, bad keys -----------------------------------------------------------

def test_revoked_key_is_refused_promptly_despite_the_gateway_cache(client: httpx.Client) -> None:
    owner = register(client)
    created = create_key(client, owner, ["projects:read"])
    key = created["key"]
    # First use: the gateway exchanges the key and caches the result (60 s TTL).
    assert client.get("/api/v1/projects", headers=key_auth(key)).status_code == 200
    assert client.get("/api/v1/projects", headers={"x-api-key": key}).status_code == 200

    r = client.delete(f"/api/v1/api-keys/{created['id']}", headers=owner.headers)
    assert r.status_code == 204, r.text
    revoked_at = time.monotonic()

    last = None
    while time.monotonic() - revoked_at < REVOCATION_DEADLINE_S:
        last = client.get("/api/v1/projects", headers=key_auth(key))
        if last.status_code != 200:
            break
        time.sleep(0.05)
    assert last is not None
    assert last.status_code == 401, (
        f"revoked key still accepted {REVOCATION_DEADLINE_S}s after revocation: {last.text}")
    assert_401(last, "api_key_revoked")
    assert_401(client.get("/api/v1/projects", headers={"x-api-key": key}), "api_key_revoked")

    shown = client.get(f"/api/v1/api-keys/{created['id']}", headers=owner.headers).json()
    assert shown["revoked_at"] is not None


def test_expired_key_is_refused_with_api_key_expired(client: httpx.Client,
                                                     platform: Platform) -> None:
    owner = register(client)
    created = create_key(client, owner, ["projects:read"], expires_in_days=1)
    public_id, _ = split_key(created["key"])
    # Expired in the database before the gateway ever saw (and cached) the key.
    platform.db_execute(f"UPDATE api_keys SET expires_at = '2000-01-01 00:00:00' "
                        f"WHERE public_id = '{public_id}'")

    r = client.get("/api/v1/projects", headers=key_auth(created["key"]))

    body = assert_401(r, "api_key_expired")
    assert "expired" in body["detail"]
    assert "www-authenticate" in r.headers


def test_malformed_keys_are_refused_as_invalid(client: httpx.Client) -> None:
    malformed = [
        "wbk_x",                                    # far too short
        "wbk_" + "A" * 16 + "_" + "s" * 40,         # public id not lower-case alphanumeric
        "wbk_abcdefghijklmnop_short",               # secret too short
        "wbk_abcdefghijklmnop",                     # no secret part
        "wbk_" + "a" * 16 + "_" + "s" * 400,        # far too long
    ]
    for key in malformed:
        for headers in (key_auth(key), {"x-api-key": key}):
            r = client.get("/api/v1/projects", headers=headers)
            body = assert_401(r, "invalid_api_key")
            # The refusal says nothing about the gateway's internal introspection call.
            assert "key:" not in body["detail"], body
            assert body["title"] == "Unauthorized"


def test_well_formed_key_with_a_wrong_secret_is_refused(client: httpx.Client) -> None:
    owner = register(client)
    key = create_key(client, owner, ["projects:read"])["key"]
    public_id, secret = split_key(key)
    wrong = f"wbk_{public_id}_{'A' * len(secret)}"

    body = assert_401(client.get("/api/v1/projects", headers=key_auth(wrong)),
                      "invalid_api_key")

    assert body["detail"] == "API key is not valid"
    # The real key still works: a wrong guess does not disturb it.
    assert client.get("/api/v1/projects", headers=key_auth(key)).status_code == 200


def test_unknown_key_id_is_refused_like_a_wrong_secret(client: httpx.Client) -> None:
    body = assert_401(client.get("/api/v1/projects",
                                 headers=key_auth("wbk_" + "z" * 16 + "_" + "s" * 43)),
                      "invalid_api_key")
    assert body["detail"] == "API key is not valid"


# ---- what is recorded -----------------------------------------------------------------------

def test_last_used_at_is_set_after_the_key_is_used(client: httpx.Client) -> None:
    owner = register(client)
    created = create_key(client, owner, ["projects:read"])
    before = client.get(f"/api/v1/api-keys/{created['id']}", headers=owner.headers).json()
    assert before["last_used_at"] is None

    assert client.get("/api/v1/projects", headers={"x-api-key": created["key"]}).status_code == 200

    after = client.get(f"/api/v1/api-keys/{created['id']}", headers=owner.headers).json()
    assert after["last_used_at"] is not None
    used = parse_time(after["last_used_at"])
    assert used >= parse_time(created["created_at"])
    assert abs(datetime.now(UTC) - used) < timedelta(minutes=5)


def test_key_timestamps_read_back_carry_a_utc_offset(client: httpx.Client) -> None:
    owner = register(client)
    created = create_key(client, owner, ["projects:read"], expires_in_days=3)
    assert client.get("/api/v1/projects", headers=key_auth(created["key"])).status_code == 200

    shown = client.get(f"/api/v1/api-keys/{created['id']}", headers=owner.headers).json()
    listed = client.get("/api/v1/api-keys", headers=owner.headers).json()["items"][0]

    for view in (created, shown, listed):
        for name in ("created_at", "expires_at", "last_used_at"):
            if view[name] is not None:
                assert has_utc_offset(view[name]), f"{name} without UTC offset: {view[name]!r}"
    assert parse_time(shown["created_at"]) == parse_time(created["created_at"])


def test_listed_keys_never_include_the_secret(client: httpx.Client) -> None:
    owner = register(client)
    created = [create_key(client, owner, ["projects:read"]) for _ in range(2)]

    r = client.get("/api/v1/api-keys", headers=owner.headers)

    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert {k["id"] for k in items} == {c["id"] for c in created}
    for item in items:
        assert "key" not in item
        assert item["prefix"].startswith("wbk_")
    one = client.get(f"/api/v1/api-keys/{created[0]['id']}", headers=owner.headers)
    assert "key" not in one.json()
    for c in created:
        _, secret = split_key(c["key"])
        assert secret not in r.text
        assert secret not in one.text


def test_database_never_holds_the_secret(client: httpx.Client, platform: Platform) -> None:
    owner = register(client)
    created = create_key(client, owner, ["projects:read"])
    key = created["key"]
    public_id, secret = split_key(key)
    assert client.get("/api/v1/projects", headers=key_auth(key)).status_code == 200
    whole_key_sha256 = hashlib.sha256(key.encode()).digest()

    rows = platform.db_rows("SELECT * FROM api_keys")
    assert any(public_id in row_text(row) for row in rows)  # the key's row is there
    for row in rows:
        text = row_text(row)
        assert secret not in text
        assert key not in text
        assert whole_key_sha256.hex() not in text
    (stored,) = platform.db_rows(
        f"SELECT secret_hash FROM api_keys WHERE public_id = '{public_id}'")
    assert bytes(stored[0]) != whole_key_sha256
    assert bytes(stored[0]).hex() != whole_key_sha256.hex()


def test_sqlite_files_never_hold_the_secret(client: httpx.Client, platform: Platform) -> None:
    if platform.mode != "embedded":
        pytest.skip("SQLite files exist in embedded mode; PostgreSQL rows are scanned above")
    owner = register(client)
    key = create_key(client, owner, ["projects:read"])["key"]
    public_id, secret = split_key(key)
    assert client.get("/api/v1/projects", headers={"x-api-key": key}).status_code == 200

    db = platform.workdir / "data" / "db" / "user.sqlite3"
    files = [p for p in (db, Path(f"{db}-wal")) if p.exists()]
    assert db in files
    contents = b"".join(p.read_bytes() for p in files)
    assert public_id.encode() in contents  # the row was written where we look
    assert secret.encode() not in contents
    assert key.encode() not in contents
    assert hashlib.sha256(key.encode()).hexdigest().encode() not in contents
    everything = [p for p in (platform.workdir / "data").rglob("*") if p.is_file()]
    for path in everything:
        assert secret.encode() not in path.read_bytes(), f"{path} holds the API key secret"
