"""Register → login → refresh → logout, and refresh-token reuse, in both run modes."""

from __future__ import annotations

import httpx

from workbench.testing import register, unique


def test_full_auth_flow(client: httpx.Client) -> None:
    user = register(client)
    me = client.get("/api/v1/auth/me", headers=user.headers)
    assert me.status_code == 200, me.text
    body = me.json()
    assert body["user"]["email"] == user.email
    assert body["role"] == "owner"
    assert body["org"]["id"] == user.org_id
    assert "org:delete" in body["permissions"]

    r = client.post("/api/v1/auth/refresh", json={"refresh_token": user.refresh_token})
    assert r.status_code == 200, r.text
    rotated = r.json()
    assert rotated["refresh_token"] != user.refresh_token
    assert client.get("/api/v1/auth/me", headers={
        "authorization": f"Bearer {rotated['access_token']}"}).status_code == 200

    r = client.post("/api/v1/auth/logout", json={"refresh_token": rotated["refresh_token"]},
                    headers={"authorization": f"Bearer {rotated['access_token']}"})
    assert r.status_code == 204
    r = client.post("/api/v1/auth/refresh", json={"refresh_token": rotated["refresh_token"]})
    assert r.status_code == 401
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == "invalid_refresh"


def test_reused_refresh_token_revokes_the_family(client: httpx.Client) -> None:
    user = register(client)
    first = client.post("/api/v1/auth/refresh", json={"refresh_token": user.refresh_token})
    assert first.status_code == 200
    newest = first.json()["refresh_token"]
    # The spent token comes back (stolen copy): refused, and the whole session ends.
    again = client.post("/api/v1/auth/refresh", json={"refresh_token": user.refresh_token})
    assert again.status_code == 401
    assert again.json()["code"] == "refresh_reused"
    legit = client.post("/api/v1/auth/refresh", json={"refresh_token": newest})
    assert legit.status_code == 401
    assert legit.json()["code"] == "invalid_refresh"


def test_wrong_password_is_401_problem(client: httpx.Client) -> None:
    user = register(client)
    r = client.post("/api/v1/auth/login", json={"email": user.email, "password": "wrong-pass-123"})
    assert r.status_code == 401
    problem = r.json()
    assert problem["code"] == "invalid_credentials"
    assert problem["status"] == 401 and problem["request_id"]
    unknown = client.post("/api/v1/auth/login",
                          json={"email": "nobody-" + user.email, "password": "whatever-1234"})
    assert unknown.status_code == 401
    assert unknown.json()["detail"] == problem["detail"]  # no hint which emails exist


def test_duplicate_email_is_409(client: httpx.Client) -> None:
    user = register(client)
    r = client.post("/api/v1/auth/register", json={
        "email": user.email.upper(), "username": unique("x"), "password": "another password 1"})
    assert r.status_code == 409
    assert r.json()["code"] == "email_taken"


def test_login_by_username_and_into_another_org(client: httpx.Client) -> None:
    user = register(client)
    org = client.post("/api/v1/orgs", json={"name": "Second"}, headers=user.headers)
    assert org.status_code == 201, org.text
    r = client.post("/api/v1/auth/login", json={"email": user.username,
                                                "password": user.password,
                                                "org_id": org.json()["id"]})
    assert r.status_code == 200, r.text
    assert r.json()["org_id"] == org.json()["id"]
    assert r.json()["role"] == "owner"


def test_sign_in_keeps_working_across_signing_key_reloads(client: httpx.Client) -> None:
    # The keyring re-reads its keys every 0.5 s in tests; signing must never wait on the
    # database (on SQLite a request's own transaction holds the write lock).
    import time

    user = register(client)
    for _ in range(4):
        time.sleep(0.6)
        started = time.monotonic()
        r = client.post("/api/v1/auth/login", json={"email": user.email,
                                                    "password": user.password})
        assert r.status_code == 200, r.text
        assert time.monotonic() - started < 5
