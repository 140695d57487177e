"""Every user-service change emits its event through the outbox, each one matching its contract
in proto/, and the relay publishes all of them — in both run modes."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import orjson

from tests.conftest import INTERNAL, REPO, Platform
from workbench.events.contracts import known_event_types, validate_event_data
from workbench.testing import add_member, register

WB = [sys.executable, "-m", "services.cli"]


def exercise_every_change(client: httpx.Client, platform: Platform) -> str:
    owner = register(client)
    h = owner.headers
    client.post("/api/v1/auth/login", json={"email": owner.email, "password": "wrong-password"})
    member = add_member(client, owner, "member")
    assert client.patch(f"/api/v1/orgs/{owner.org_id}/members/{member.user_id}",
                        json={"role": "viewer"}, headers=h).status_code == 200
    assert client.delete(f"/api/v1/orgs/{owner.org_id}/members/{member.user_id}",
                         headers=h).status_code == 204
    assert client.patch(f"/api/v1/orgs/{owner.org_id}", json={"name": "Renamed"},
                        headers=h).status_code == 200
    project = client.post("/api/v1/projects", json={"name": "Events"}, headers=h).json()
    assert client.patch(f"/api/v1/projects/{project['id']}", json={"description": "d"},
                        headers=h).status_code == 200
    assert client.delete(f"/api/v1/projects/{project['id']}", headers=h).status_code == 204
    key = client.post("/api/v1/api-keys", json={"name": "k", "scopes": ["projects:read"]},
                      headers=h).json()
    assert client.delete(f"/api/v1/api-keys/{key['id']}", headers=h).status_code == 204
    spent = owner.refresh_token
    assert client.post("/api/v1/auth/refresh", json={"refresh_token": spent}).status_code == 200
    assert client.post("/api/v1/auth/refresh", json={"refresh_token": spent}).status_code == 401
    other = client.post("/api/v1/orgs", json={"name": "Doomed"}, headers=h).json()
    doomed = client.post("/api/v1/auth/login", json={
        "email": owner.email, "password": owner.password, "org_id": other["id"]}).json()
    dh = {"authorization": f"Bearer {doomed['access_token']}"}
    assert client.post("/api/v1/auth/logout", headers=dh).status_code == 204
    assert client.delete(f"/api/v1/orgs/{other['id']}", headers=dh).status_code == 204
    # Operator actions: quota limits and signing-key rotation.
    if platform.user_url:
        ops = {"x-wb-internal-token": INTERNAL}
        r = httpx.put(f"{platform.user_url}/internal/v1/orgs/{owner.org_id}/quotas",
                      json={"limits": {"projects": 7}}, headers=ops)
        assert r.status_code == 204, r.text
        assert httpx.post(f"{platform.user_url}/internal/v1/signing-keys/rotate",
                          headers=ops).status_code == 200
    else:
        env = platform.env
        subprocess.run([*WB, "quota", "set", owner.org_id, "projects", "7"], env=env,
                       check=True, cwd=REPO, capture_output=True)
        subprocess.run([*WB, "keys", "rotate"], env=env, check=True, cwd=REPO,
                       capture_output=True)
    return owner.org_id


def test_every_change_emits_a_valid_event_that_gets_published(
    client: httpx.Client, platform: Platform
) -> None:
    org_id = exercise_every_change(client, platform)
    deadline = time.monotonic() + 15
    while True:
        rows = platform.db_rows("SELECT type, payload, published_at FROM wb_outbox")
        pending = [r for r in rows if r[2] is None]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not pending, f"{len(pending)} events never left the outbox"
    seen: set[str] = set()
    for event_type, payload, _ in rows:
        envelope = orjson.loads(bytes(payload))
        assert envelope["type"] == event_type
        validate_event_data(event_type, envelope["data"])
        seen.add(event_type)
    user_types = {t for t in known_event_types() if t.startswith("wb.user.")}
    assert user_types <= seen, f"never emitted: {sorted(user_types - seen)}"
    quota = [orjson.loads(bytes(p)) for t, p, _ in rows if t == "wb.user.quota.updated"]
    assert any(e["org_id"] == org_id and e["data"]["limits"] == {"projects": 7} for e in quota)
