"""The gateway: the one entry of the platform. A pure ASGI app on the hot path (authenticate,
rate-limit, strip internal headers, forward, stream back) beside a small ops app for health,
metrics and the aggregated API docs."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import swagger_ui
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.access import Access, AccessRecorder
from gateway.auth import Authenticator
from gateway.openapi import merge_specs
from gateway.proxy import AsgiUpstream, HttpUpstream, Upstream
from gateway.routes import DEFAULT_ROUTES, UPLOAD_ROUTES, RouteTable
from gateway.settings import GatewaySettings
from workbench import context
from workbench.app import create_app
from workbench.client import ServiceClient
from workbench.errors import RateLimited, ServiceUnavailable, Unauthorized, WorkbenchError
from workbench.events.bus import EventBus, Subscription
from workbench.identity.deps import bearer_token
from workbench.identity.tokens import TokenVerifier
from workbench.middleware import RequestMiddleware
from workbench.problems import (
    PROBLEM_CONTENT_TYPE,
    is_openai_path,
    openai_error_bytes,
    problem_bytes,
)
from workbench.ratelimit import (
    Decision,
    MemoryRateLimiter,
    Rate,
    RateLimiter,
    RedisRateLimiter,
)
from workbench.settings import RunMode

log = logging.getLogger("gateway")

SWAGGER_STATIC = Path(swagger_ui.__file__).parent / "static"
# Headers only the platform may set; a client that sends them is ignored.
INTERNAL_HEADER_PREFIXES = (b"x-wb-", b"x-forwarded-", b"x-real-ip", b"forwarded",
                            b"x-principal", b"x-user-id", b"x-org-id")


async def send_problem(send: Send, err: WorkbenchError,
                       extra_headers: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
                       *, path: str = "") -> None:
    """problem+json, or OpenAI's error shape on the OpenAI-compatible routes (/v1/…)."""
    if is_openai_path(path):
        body = openai_error_bytes(err.status, err.code, err.detail)
        content_type = b"application/json"
    else:
        body = problem_bytes(err.status, err.code, err.title, err.detail, **err.extra)
        content_type = PROBLEM_CONTENT_TYPE.encode()
    headers = [(b"content-type", content_type),
               (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    headers += list(extra_headers)
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Gateway:
    """The proxying core. `upstreams` maps service names to how to reach them."""

    def __init__(self, settings: GatewaySettings, upstreams: Mapping[str, Upstream],
                 authenticator: Authenticator, limiter: RateLimiter | None,
                 fallback: ASGIApp, routes: RouteTable = DEFAULT_ROUTES,
                 recorder: AccessRecorder | None = None) -> None:
        self.settings = settings
        self.routes = routes
        self.recorder = recorder
        self.upstreams = upstreams
        self.auth = authenticator
        self.limiter = limiter
        self.fallback = fallback
        self.rate_auth = Rate.parse(settings.rate_limit_authenticated)
        self.rate_anon = Rate.parse(settings.rate_limit_anonymous)
        self.trusted = [ipaddress.ip_network(n, strict=False) for n in settings.trusted_proxies]

    def client_ip(self, scope: Scope) -> str:
        peer = (scope.get("client") or ("unknown", 0))[0]
        if self.trusted and _in(peer, self.trusted):
            for k, v in scope["headers"]:
                if k == b"x-forwarded-for":
                    # The right-most address not of a trusted proxy is the client.
                    for hop in reversed([h.strip() for h in v.decode("latin-1").split(",")]):
                        if hop and not _in(hop, self.trusted):
                            return hop
        return str(peer)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.fallback(scope, receive, send)
            return
        path: str = scope["path"]
        service = self.routes.service_for(path)
        if service is None:
            await self.fallback(scope, receive, send)
            return
        ip = self.client_ip(scope)
        if self.recorder is None:
            await self._route(scope, receive, send, service, path, ip)
            return
        started = time.perf_counter()
        status = 500

        async def send_recorded(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._route(scope, receive, send_recorded, service, path, ip)
        finally:
            principal = scope.get("state", {}).get("principal")
            ctx = context.current()
            self.recorder.record(Access(
                method=scope["method"], path=path,
                route=getattr(scope.get("route"), "path", "unmatched"), service=service,
                status=status, duration_ms=(time.perf_counter() - started) * 1000,
                client_ip=ip,
                user_agent=_user_agent(scope["headers"]),
                actor=principal.actor if principal is not None else "anonymous",
                org_id=str(principal.org_id) if principal is not None else None,
                request_id=ctx.request_id if ctx else None,
                traceparent=ctx.traceparent if ctx else None,
            ))

    async def _route(self, scope: Scope, receive: Receive, send: Send, service: str,
                     path: str, ip: str) -> None:
        upstream = self.upstreams.get(service)
        # Metrics and access logs of the gateway are labelled by route-table entry.
        scope["route"] = self.routes.label_for(service, path)
        if upstream is None:
            await send_problem(send, ServiceUnavailable(
                f"the {service} service is not deployed in this installation",
                code="service_not_deployed"), path=path)
            return
        method: str = scope["method"]
        headers: list[tuple[bytes, bytes]] = []
        authorization: str | None = None
        api_key: str | None = None
        for k, v in scope["headers"]:
            if k.startswith(INTERNAL_HEADER_PREFIXES):
                continue
            if k == b"authorization":
                authorization = v.decode("latin-1")
                continue
            if k == b"x-api-key":
                api_key = v.decode("latin-1").strip()
                continue
            headers.append((k, v))
        try:
            if self.routes.is_public(method, path):
                bucket, rate = f"ip:{ip}", self.rate_anon
            else:
                credential = api_key or bearer_token(authorization)
                if not credential:
                    raise Unauthorized("credentials are required: send "
                                       "'Authorization: Bearer <token or API key>'")
                try:
                    principal, replacement = await self.auth.authenticate(credential)
                except Unauthorized:
                    # Failed credentials spend the client IP's anonymous budget, so guessing
                    # keys or tokens is rate-limited like any anonymous traffic.
                    await self._limit(f"ip:{ip}", self.rate_anon)
                    raise
                token = replacement or credential
                headers.append((b"authorization", b"Bearer " + token.encode("latin-1")))
                scope.setdefault("state", {})["principal"] = principal
                bucket = f"k:{principal.key_id}" if principal.key_id else f"u:{principal.user_id}"
                rate = self.rate_auth
            decision = await self._limit(bucket, rate)
        except WorkbenchError as err:
            await send_problem(send, err, path=path)
            return
        ctx = context.current()
        if ctx is not None:
            headers.append((b"x-request-id", ctx.request_id.encode()))
            if ctx.traceparent:
                headers = [(k, v) for k, v in headers if k != b"traceparent"]
                headers.append((b"traceparent", ctx.traceparent.encode()))
        headers.append((b"x-forwarded-for", ip.encode()))
        headers.append((b"x-forwarded-proto", scope.get("scheme", "http").encode()))

        started = False
        rl_headers = decision.headers() if decision else []

        async def send_upstream(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if rl_headers:
                    message = {**message, "headers": [*message.get("headers", []), *rl_headers]}
            await send(message)

        try:
            await upstream.forward(scope, receive, send_upstream, headers)
        except WorkbenchError as err:
            if started:
                raise
            await send_problem(send, err, path=path)

    async def _limit(self, bucket: str, rate: Rate) -> Decision | None:
        if self.limiter is None:
            return None
        decision = await self.limiter.acquire(bucket, rate)
        if not decision.allowed:
            raise RateLimited(
                f"rate limit of {rate.limit} requests per {rate.window_s}s exceeded; "
                f"retry in {decision.reset_s}s",
                headers={k.decode(): v.decode() for k, v in decision.headers()},
            )
        return decision


def _user_agent(headers: list[tuple[bytes, bytes]]) -> str:
    agent = b""
    for k, v in headers:  # the last one, as a dict of the headers would have it
        if k == b"user-agent":
            agent = v
    return agent.decode("latin-1")[:300]


def _in(addr: str, nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip in n for n in nets)


_frozen = 0


def _freeze_heap() -> bool:
    """A gateway process of its own starts up with some 150,000 long-lived objects (frameworks,
    schemas, clients), which every full garbage collection walked again: a stall of about
    100 ms every few thousand requests. Frozen once started, they are left out of collections
    until the gateway stops (measured: full collections then take a few ms)."""
    global _frozen
    if _frozen == 0:
        gc.collect()
        gc.freeze()
    _frozen += 1
    return True


def _thaw_heap() -> None:
    global _frozen
    _frozen -= 1
    if _frozen == 0:
        gc.unfreeze()


SpecLoader = Callable[[], Awaitable[dict[str, Any]]]


def create_gateway(
    settings: GatewaySettings | None = None,
    *,
    apps: Mapping[str, ASGIApp] | None = None,
    bus: EventBus | None = None,
    routes: RouteTable = DEFAULT_ROUTES,
) -> FastAPI:
    """Embedded mode passes `apps` (service name → in-process app) and the shared `bus`;
    distributed mode reads `settings.upstreams` and subscribes on NATS."""
    settings = settings or GatewaySettings()
    apps = dict(apps or {})
    state: dict[str, Any] = {}

    def spec_loaders() -> dict[str, SpecLoader]:
        loaders: dict[str, SpecLoader] = {}
        for name, app in apps.items():
            async def local(app: Any = app) -> dict[str, Any]:
                spec: dict[str, Any] = app.openapi()
                return spec
            loaders[name] = local
        for name, client in state.get("clients", {}).items():
            if name in apps:
                continue

            async def remote(client: ServiceClient = client) -> dict[str, Any]:
                resp = await client.get("/openapi.json")
                resp.raise_for_status()
                spec: dict[str, Any] = resp.json()
                return spec
            loaders[name] = remote
        return loaders

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import httpx

        clients: dict[str, ServiceClient] = {}
        upstreams: dict[str, Upstream] = {}
        for name, service_app in apps.items():
            upstreams[name] = AsgiUpstream(name, service_app)
            clients[name] = ServiceClient(
                name, "http://embedded",
                transport=httpx.ASGITransport(service_app, raise_app_exceptions=False))
        for name, url in settings.upstreams.items():
            if name in apps:
                continue
            upstreams[name] = HttpUpstream(
                name, url, connect_timeout_s=settings.upstream_connect_timeout_s,
                read_timeout_s=settings.upstream_read_timeout_s)
            clients[name] = ServiceClient(name, url)
        state["clients"] = clients
        if "user" not in clients:
            raise RuntimeError("the gateway needs the user service: set WB_UPSTREAMS")
        user = clients["user"]

        async def jwks() -> dict[str, Any]:
            resp = await user.get("/.well-known/jwks.json")
            resp.raise_for_status()
            data: dict[str, Any] = resp.json()
            return data

        verifier = TokenVerifier(jwks, issuer=settings.jwt_issuer,
                                 audience=settings.jwt_audience, leeway_s=settings.jwt_leeway_s,
                                 min_refresh_interval_s=settings.jwks_min_refresh_interval_s)
        authenticator = Authenticator(
            verifier, user, internal_token=settings.internal_token.get_secret_value(),
            cache_ttl_s=settings.api_key_cache_ttl_s)
        limiter: RateLimiter | None = None
        if settings.rate_limit_enabled:
            if settings.mode is RunMode.DISTRIBUTED:
                redis_limiter = RedisRateLimiter(settings.redis_url)
                limiter = redis_limiter
                app.state.readiness["redis"] = redis_limiter.ping
            else:
                limiter = MemoryRateLimiter()
        subscription: Subscription | None = None
        own_bus = False
        event_bus = bus
        if event_bus is None and settings.mode is RunMode.DISTRIBUTED:
            from workbench.events.nats_bus import JetStreamBus

            event_bus = JetStreamBus(settings.nats_url, stream=settings.nats_stream,
                                     name="gateway")
            own_bus = True
            try:
                await event_bus.start()
            except Exception as exc:  # revocations then rely on the cache TTL
                log.warning("gateway: NATS unavailable (%s); API key cache relies on TTL", exc)
                event_bus = None
        recorder: AccessRecorder | None = None
        if event_bus is not None:
            subscription = await event_bus.subscribe_broadcast("wb.user.>",
                                                               authenticator.on_event)
            if settings.access_records:
                recorder = AccessRecorder(event_bus)
                recorder.start()
        core.recorder = recorder
        core.auth = authenticator
        core.upstreams = upstreams
        core.limiter = limiter
        for name, client in clients.items():
            app.state.readiness[f"upstream:{name}"] = _upstream_check(client)
        frozen = settings.mode is RunMode.DISTRIBUTED and _freeze_heap()
        try:
            yield
        finally:
            if frozen:
                _thaw_heap()
            if recorder is not None:
                await recorder.stop()
            if subscription is not None:
                await subscription.stop()
            if own_bus and event_bus is not None:
                await event_bus.close()
            for u in upstreams.values():
                await u.close()
            for c in clients.values():
                await c.aclose()
            if limiter is not None:
                await limiter.close()

    ops = create_app(service="gateway", settings=settings, lifespan=lifespan,
                     title="xai-workbench gateway", openapi_url=None, docs_url=None,
                     with_middleware=False)
    spec_cache: dict[str, Any] = {}

    @ops.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        if "spec" not in spec_cache or time.monotonic() - spec_cache["at"] > 30:
            specs: dict[str, dict[str, Any]] = {}
            loaders = spec_loaders()
            results = await asyncio.gather(*(f() for f in loaders.values()),
                                           return_exceptions=True)
            for name, result in zip(loaders, results, strict=True):
                if isinstance(result, BaseException):
                    log.warning("openapi: %s service did not answer: %s", name, result)
                else:
                    specs[name] = result
            spec_cache["spec"] = merge_specs(specs, title="xai-workbench API", version="0.1.0",
                                             routes=routes)
            spec_cache["at"] = time.monotonic()
        return JSONResponse(spec_cache["spec"])

    @ops.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title="xai-workbench API",
            swagger_js_url="/docs/static/swagger-ui-bundle.js",
            swagger_css_url="/docs/static/swagger-ui.css",
            swagger_favicon_url="/docs/static/favicon-32x32.png",
        )

    ops.mount("/docs/static", StaticFiles(directory=SWAGGER_STATIC), name="swagger-static")

    core = _GatewayCore(settings, ops, routes)
    # The request middleware (ids, metrics, access log, body limit) wraps proxy and ops alike.
    wrapped = RequestMiddleware(core, service="gateway", max_body_bytes=settings.max_body_bytes,
                                body_limit_overrides={
                                    pattern: settings.upload_max_body_bytes
                                    for pattern in UPLOAD_ROUTES},
                                log_access=settings.access_log)
    ops.state.gateway_asgi = wrapped
    ops.state.core = core
    return _GatewayApp(ops, wrapped)  # type: ignore[return-value]


class _GatewayCore:
    """Built before the lifespan has made the clients; filled in by it."""

    def __init__(self, settings: GatewaySettings, ops: FastAPI, routes: RouteTable) -> None:
        self.settings = settings
        self.ops = ops
        self.routes = routes
        self.auth: Authenticator | None = None
        self.upstreams: dict[str, Upstream] = {}
        self.limiter: RateLimiter | None = None
        self.recorder: AccessRecorder | None = None
        self._gateway: Gateway | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._gateway is None:
            if self.auth is None:
                # Not started yet (or ops-only request before the lifespan ran).
                await self.ops(scope, receive, send)
                return
            self._gateway = Gateway(self.settings, self.upstreams, self.auth, self.limiter,
                                    self.ops, self.routes, self.recorder)
        await self._gateway(scope, receive, send)


class _GatewayApp:
    """An ASGI app: lifespan goes to the ops app (which owns startup), HTTP to the gateway."""

    def __init__(self, ops: FastAPI, wrapped: ASGIApp) -> None:
        self.ops = ops
        self.wrapped = wrapped
        self.state = ops.state
        self.routes = ops.routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.ops(scope, receive, send)
        else:
            await self.wrapped(scope, receive, send)


def _upstream_check(client: ServiceClient) -> Callable[[], Awaitable[None]]:
    async def check() -> None:
        resp = await client.get("/readyz")
        if resp.status_code != 200:
            raise ConnectionError(f"readyz answered {resp.status_code}")
    return check
