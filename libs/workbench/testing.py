"""Test support shared by every service's tests: throwaway PostgreSQL databases, and factories
that create users, orgs and tokens through the public API. Real servers on free ports are in
`workbench.devservers` (re-exported here)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import httpx

from workbench.devservers import (
    S3_ACCESS_KEY,
    S3_SECRET_KEY,
    NatsServer,
    RedisServer,
    SeaweedServer,
    ServerProcess,
    free_port,
    nats_server_binary,
    wait_for_port,
    wait_http,
    weed_binary,
)

__all__ = [
    "S3_ACCESS_KEY", "S3_SECRET_KEY", "ApiUser", "NatsServer", "RedisServer", "SeaweedServer",
    "ServerProcess", "add_member", "create_pg_database", "drop_pg_database", "free_port",
    "login", "nats_server_binary", "register", "switch_org", "unique", "wait_for_port",
    "wait_http", "weed_binary",
]

PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


async def create_pg_database(prefix: str = "wb_test") -> tuple[str, str]:
    """A fresh database; returns (name, SQLAlchemy asyncpg URL)."""
    import asyncpg

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name, f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"


async def drop_pg_database(name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def unique(prefix: str = "u") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


@dataclass
class ApiUser:
    """A registered, signed-in user of a running platform."""

    email: str
    username: str
    password: str
    user_id: str
    org_id: str
    access_token: str
    refresh_token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.access_token}"}


def register(client: httpx.Client, *, password: str = "correct horse battery staple",
             org_id: str | None = None) -> ApiUser:
    name = unique("user")
    email = f"{name}@example.com"
    r = client.post("/api/v1/auth/register",
                    json={"email": email, "username": name, "password": password})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return login(client, email, password, user_id=body["user"]["id"], org_id=org_id)


def login(client: httpx.Client, email: str, password: str, *, user_id: str,
          org_id: str | None = None) -> ApiUser:
    payload: dict[str, Any] = {"email": email, "password": password}
    if org_id:
        payload["org_id"] = org_id
    r = client.post("/api/v1/auth/login", json=payload)
    assert r.status_code == 200, r.text
    t = r.json()
    return ApiUser(email=email, username=email.split("@")[0], password=password,
                   user_id=user_id, org_id=t["org_id"], access_token=t["access_token"],
                   refresh_token=t["refresh_token"])


def switch_org(client: httpx.Client, user: ApiUser, org_id: str) -> ApiUser:
    r = client.post("/api/v1/auth/refresh",
                    json={"refresh_token": user.refresh_token, "org_id": org_id})
    assert r.status_code == 200, r.text
    t = r.json()
    return ApiUser(user.email, user.username, user.password, user.user_id, t["org_id"],
                   t["access_token"], t["refresh_token"])


def add_member(client: httpx.Client, owner: ApiUser, role: str) -> ApiUser:
    """A new user who is a member of `owner`'s org with `role`, signed in to that org."""
    other = register(client)
    r = client.post(f"/api/v1/orgs/{owner.org_id}/members",
                    json={"email": other.email, "role": role}, headers=owner.headers)
    assert r.status_code == 201, r.text
    return switch_org(client, other, owner.org_id)
