"""Fixtures shared by every test level: the running platform in both modes (real processes),
and the real servers behind the distributed one."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from workbench.testing import (
    NatsServer,
    SeaweedServer,
    ServerProcess,
    create_pg_database,
    drop_pg_database,
    free_port,
    wait_http,
)

REPO = Path(__file__).resolve().parents[1]
SECRET = "test-secret-key-0123456789abcdef"
INTERNAL = "test-internal-token-0123456789ab"
WB = [sys.executable, "-m", "services.cli"]
FORBIDDEN_IN_RESPONSES = ("password_hash", "secret_hash", "$argon2", "private_pem",
                          "token_hash", "BEGIN ENCRYPTED PRIVATE KEY")


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WB_")}
    env.update({
        "PYTHONUNBUFFERED": "1",
        "WB_SECRET_KEY": SECRET,
        "WB_INTERNAL_TOKEN": INTERNAL,
        "WB_RATE_LIMIT_AUTHENTICATED": "100000/60",
        "WB_RATE_LIMIT_ANONYMOUS": "100000/60",
        "WB_ACCESS_LOG": "false",
        "WB_OUTBOX_POLL_INTERVAL_S": "0.2",
        # Still argon2id, at the lowest cost the settings allow: hundreds of sign-ups per run.
        "WB_PASSWORD_TIME_COST": "1",
        "WB_PASSWORD_MEMORY_KIB": "8192",
        # Keys are re-read often, so sign-ins overlap a reload all the time.
        "WB_KEYRING_RELOAD_INTERVAL_S": "0.5",
        # A replica that cannot start fails its deployment after 2 quick tries, not 5 slow ones.
        "WB_INFERENCE_RESTART_BACKOFF_S": "0.2",
        "WB_INFERENCE_MAX_RESTARTS": "2",
    })
    env.update(extra)
    return env


@dataclass
class Platform:
    """A running platform. `url` is the gateway; `user_url` reaches the user service directly
    (distributed mode only)."""

    mode: str
    url: str
    env: dict[str, str]
    workdir: Path
    user_url: str | None = None
    audit_url: str | None = None
    data_url: str | None = None
    inference_url: str | None = None
    kb_url: str | None = None
    processes: list[ServerProcess] = field(default_factory=list)

    def client(self, **kw: Any) -> httpx.Client:
        kw.setdefault("timeout", 30.0)
        return httpx.Client(base_url=self.url,
                            event_hooks={"response": [no_secrets_in_response]}, **kw)

    def db_rows(self, sql: str, service: str = "user") -> list[tuple[Any, ...]]:
        """Run a read query on a service's database (for checks of what is stored)."""
        if self.mode == "embedded":
            with sqlite3.connect(self.workdir / "data" / "db" / f"{service}.sqlite3") as conn:
                return list(conn.execute(sql).fetchall())
        return asyncio.run(_pg_rows(self.env["WB_DATABASE_URL"], sql, service))

    def db_execute(self, sql: str, service: str = "user") -> None:
        if self.mode == "embedded":
            with sqlite3.connect(self.workdir / "data" / "db" / f"{service}.sqlite3") as conn:
                conn.execute(sql)
            return
        asyncio.run(_pg_execute(self.env["WB_DATABASE_URL"], sql, service))

    def object_keys(self, prefix: str = "") -> list[str]:
        """Keys in the platform's object store under `prefix` (the local folder in embedded
        mode, the S3 bucket in distributed mode)."""
        if self.mode == "embedded":
            root = self.workdir / "data" / "objects" / "data"
            return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                          if p.is_file() and p.relative_to(root).as_posix().startswith(prefix))
        from minio import Minio

        endpoint = self.env["WB_S3_ENDPOINT"].removeprefix("http://")
        mc = Minio(endpoint, access_key=self.env["WB_S3_ACCESS_KEY"],
                   secret_key=self.env["WB_S3_SECRET_KEY"], secure=False)
        return sorted(o.object_name for o in mc.list_objects(
            self.env["WB_S3_BUCKET"], prefix=prefix, recursive=True) if o.object_name)

    def object_bytes(self, key: str) -> bytes:
        if self.mode == "embedded":
            return (self.workdir / "data" / "objects" / "data" / key).read_bytes()
        from minio import Minio

        endpoint = self.env["WB_S3_ENDPOINT"].removeprefix("http://")
        mc = Minio(endpoint, access_key=self.env["WB_S3_ACCESS_KEY"],
                   secret_key=self.env["WB_S3_SECRET_KEY"], secure=False)
        resp = mc.get_object(self.env["WB_S3_BUCKET"], key)
        try:
            return resp.read()
        finally:
            resp.close()
            resp.release_conn()

    def active_signing_key(self) -> tuple[str, Any]:
        rows = self.db_rows("SELECT kid, private_pem FROM signing_keys WHERE retired_at IS NULL")
        kid, pem = rows[-1]
        return kid, serialization.load_pem_private_key(bytes(pem), SECRET.encode())


def _pg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


async def _pg_rows(url: str, sql: str, service: str) -> list[tuple[Any, ...]]:
    import asyncpg

    conn = await asyncpg.connect(_pg_dsn(url), server_settings={"search_path": f"wb_{service}"})
    try:
        return [tuple(r) for r in await conn.fetch(sql)]
    finally:
        await conn.close()


async def _pg_execute(url: str, sql: str, service: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(_pg_dsn(url), server_settings={"search_path": f"wb_{service}"})
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def no_secrets_in_response(response: httpx.Response) -> None:
    """Every response any e2e test sees is checked: no hash, key or secret ever leaves."""
    response.read()
    text = response.text
    for marker in FORBIDDEN_IN_RESPONSES:
        assert marker not in text, f"response of {response.request.url} contains {marker!r}"


def _start_embedded(workdir: Path) -> Platform:
    port = free_port()
    env = base_env(WB_MODE="embedded", WB_DATA_DIR=str(workdir / "data"))
    proc = ServerProcess([*WB, "up", "--port", str(port)], env=env,
                         log=workdir / "embedded.log").start()
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/readyz", proc=proc.proc, log=proc.log, timeout=60)
    return Platform("embedded", url, env, workdir, processes=[proc])


def _start_distributed(workdir: Path, nats_url: str, db_url: str,
                       s3: SeaweedServer) -> Platform:
    user_port, audit_port, data_port, gw_port = free_port(), free_port(), free_port(), free_port()
    inference_port, kb_port = free_port(), free_port()
    env = base_env(
        WB_MODE="distributed", WB_DATA_DIR=str(workdir / "data"), WB_DATABASE_URL=db_url,
        WB_NATS_URL=nats_url, WB_REDIS_URL="redis://127.0.0.1:6379/0",
        WB_UPSTREAMS=(f'{{"user": "http://127.0.0.1:{user_port}", '
                      f'"data": "http://127.0.0.1:{data_port}", '
                      f'"inference": "http://127.0.0.1:{inference_port}", '
                      f'"kb": "http://127.0.0.1:{kb_port}", '
                      f'"audit": "http://127.0.0.1:{audit_port}"}}'),
        WB_USER_URL=f"http://127.0.0.1:{user_port}",
        WB_INFERENCE_URL=f"http://127.0.0.1:{inference_port}",
        WB_DATA_URL=f"http://127.0.0.1:{data_port}",
        WB_JWKS_URL=f"http://127.0.0.1:{user_port}/.well-known/jwks.json",
        **s3.env(bucket=f"wb-{workdir.name[-8:].lower().replace('_', '-')}"),
    )
    import subprocess

    subprocess.run([*WB, "migrate"], env=env, check=True, cwd=REPO, capture_output=True)
    user = ServerProcess([*WB, "serve", "user", "--port", str(user_port)], env=env,
                         log=workdir / "user.log").start()
    wait_http(f"http://127.0.0.1:{user_port}/readyz", proc=user.proc, log=user.log)
    audit = ServerProcess([*WB, "serve", "audit", "--port", str(audit_port)], env=env,
                          log=workdir / "audit.log").start()
    wait_http(f"http://127.0.0.1:{audit_port}/readyz", proc=audit.proc, log=audit.log)
    data = ServerProcess([*WB, "serve", "data", "--port", str(data_port)], env=env,
                         log=workdir / "data.log").start()
    wait_http(f"http://127.0.0.1:{data_port}/readyz", proc=data.proc, log=data.log)
    inference = ServerProcess([*WB, "serve", "inference", "--port", str(inference_port)],
                              env=env, log=workdir / "inference.log").start()
    wait_http(f"http://127.0.0.1:{inference_port}/readyz", proc=inference.proc,
              log=inference.log)
    kb = ServerProcess([*WB, "serve", "kb", "--port", str(kb_port)], env=env,
                       log=workdir / "kb.log").start()
    wait_http(f"http://127.0.0.1:{kb_port}/readyz", proc=kb.proc, log=kb.log)
    gw = ServerProcess([*WB, "serve", "gateway", "--port", str(gw_port)], env=env,
                       log=workdir / "gateway.log").start()
    wait_http(f"http://127.0.0.1:{gw_port}/readyz", proc=gw.proc, log=gw.log)
    return Platform("distributed", f"http://127.0.0.1:{gw_port}", env, workdir,
                    user_url=f"http://127.0.0.1:{user_port}",
                    audit_url=f"http://127.0.0.1:{audit_port}",
                    data_url=f"http://127.0.0.1:{data_port}",
                    inference_url=f"http://127.0.0.1:{inference_port}",
                    kb_url=f"http://127.0.0.1:{kb_port}",
                    processes=[user, audit, data, inference, kb, gw])


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path_factory.mktemp("nats")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    server = SeaweedServer(tmp_path_factory.mktemp("seaweedfs")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    name, url = asyncio.run(create_pg_database())
    yield url
    asyncio.run(drop_pg_database(name))


@pytest.fixture(scope="session")
def embedded_platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    p = _start_embedded(tmp_path_factory.mktemp("embedded"))
    yield p
    for proc in p.processes:
        proc.stop()


@pytest.fixture(scope="session")
def distributed_platform(tmp_path_factory: pytest.TempPathFactory, nats_server: NatsServer,
                         pg_database: str, s3_server: SeaweedServer) -> Iterator[Platform]:
    p = _start_distributed(tmp_path_factory.mktemp("distributed"), nats_server.url, pg_database,
                           s3_server)
    yield p
    for proc in reversed(p.processes):
        proc.stop()


@pytest.fixture(scope="session", params=["embedded", "distributed"])
def platform(request: pytest.FixtureRequest) -> Platform:
    """The same API tests run against both run modes."""
    fixture = f"{request.param}_platform"
    result: Platform = request.getfixturevalue(fixture)
    return result


@pytest.fixture
def client(platform: Platform) -> Iterator[httpx.Client]:
    with platform.client() as c:
        yield c
