"""Pure ASGI middleware of every app (no BaseHTTPMiddleware: it costs throughput): request id,
trace span, body-size limit, metrics and the access log, in one pass."""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from workbench import context
from workbench.errors import PayloadTooLarge
from workbench.observability import HTTP_LATENCY, HTTP_REQUESTS, traceparent_of
from workbench.problems import PROBLEM_CONTENT_TYPE, problem_bytes

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
access_log = logging.getLogger("workbench.access")
tracer = trace.get_tracer("workbench")


def client_ip(scope: Scope) -> str | None:
    client = scope.get("client")
    return client[0] if client else None


def _record_error(span: Span, exc: Exception) -> None:
    """As `trace.use_span` does for an exception leaving the span's scope."""
    if span.is_recording():
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


class RequestMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        service: str,
        max_body_bytes: int,
        body_limit_overrides: dict[str, int] | None = None,
        log_access: bool = True,
    ) -> None:
        self.app = app
        self.service = service
        self.max_body = max_body_bytes
        self.overrides = sorted((body_limit_overrides or {}).items(), key=lambda kv: -len(kv[0]))
        self.log_access = log_access
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def _limit_for(self, path: str) -> int:
        # A key starting with "^" is a regular expression (upload routes have ids in them),
        # any other key a path prefix.
        for pattern, limit in self.overrides:
            if pattern.startswith("^"):
                if re.match(pattern, path):
                    return limit
            elif path.startswith(pattern):
                return limit
        return self.max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        for k, v in scope["headers"]:
            headers[k.decode("latin-1")] = v.decode("latin-1")
        rid = headers.get("x-request-id", "")
        if not REQUEST_ID_RE.match(rid):
            rid = uuid.uuid4().hex
        method: str = scope["method"]
        path: str = scope["path"]
        limit = self._limit_for(path)
        start = time.perf_counter()
        status_holder = [500]
        exceeded = [False]
        started = [False]

        # What `tracer.start_as_current_span` does, without its two generator-based context
        # managers per request: the span is current while the request runs (logs carry its
        # ids), an escaping exception is recorded on it, and it ends last.
        span = tracer.start_span(f"{method} {path}", context=extract(headers),
                                 kind=SpanKind.SERVER)
        otel_token = otel_context.attach(trace.set_span_in_context(span))
        try:
            token = context.bind(
                context.RequestContext(
                    request_id=rid,
                    traceparent=traceparent_of(span),
                    authorization=headers.get("authorization"),
                    client_ip=client_ip(scope),
                )
            )
            try:
                declared = headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > limit:
                    await self._too_large(send, rid, limit)
                    status_holder[0] = 413
                    return

                received = [0]

                async def limited_receive() -> Message:
                    message = await receive()
                    if message["type"] == "http.request":
                        received[0] += len(message.get("body", b""))
                        if received[0] > limit:
                            exceeded[0] = True
                            raise PayloadTooLarge(f"request body exceeds {limit} bytes")
                    return message

                async def send_wrapper(message: Message) -> None:
                    if message["type"] == "http.response.start":
                        if exceeded[0]:
                            # The framework turned the read failure into a generic error; the
                            # client gets the real reason.
                            started[0] = True
                            status_holder[0] = 413
                            await self._too_large(send, rid, limit)
                            return
                        started[0] = True
                        status_holder[0] = message["status"]
                        headers_out = list(message.get("headers", []))
                        # A proxied response already carries the id the service echoed.
                        if not any(k.lower() == b"x-request-id" for k, _ in headers_out):
                            headers_out.append((b"x-request-id", rid.encode()))
                        message["headers"] = headers_out
                    elif exceeded[0]:
                        return
                    await send(message)

                try:
                    await self.app(scope, limited_receive, send_wrapper)
                except Exception as exc:
                    if started[0]:
                        raise
                    # Answered here, inside the request context, so the 500 still carries
                    # the request id and never a stack trace.
                    logging.getLogger("workbench.app").error("unhandled error", exc_info=exc)
                    status_holder[0] = 500
                    body = problem_bytes(
                        500, "internal_error", "Internal error",
                        "the server failed to handle this request; it has been logged under "
                        "the request id",
                    )
                    await send({
                        "type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", PROBLEM_CONTENT_TYPE.encode()),
                                    (b"content-length", str(len(body)).encode()),
                                    (b"x-request-id", rid.encode())],
                    })
                    await send({"type": "http.response.body", "body": body})
            finally:
                context.reset(token)
                elapsed = time.perf_counter() - start
                route = scope.get("route")
                route_path = getattr(route, "path", None) or "unmatched"
                status = status_holder[0]
                span.set_attribute("http.status_code", status)
                counter, latency = self._metrics(method, route_path, status)
                counter.inc()
                latency.observe(elapsed)
                if self.log_access:
                    principal: Any = scope.get("state", {}).get("principal")
                    access_log.info(
                        "%s %s %s",
                        method,
                        path,
                        status,
                        extra={
                            "service": self.service,
                            "http_method": method,
                            "path": path,
                            "route": route_path,
                            "status": status,
                            "duration_ms": round(elapsed * 1000, 3),
                            "client_ip": client_ip(scope),
                            "actor": getattr(principal, "actor", None),
                            "request_id": rid,
                        },
                    )
        except Exception as exc:
            _record_error(span, exc)
            raise
        finally:
            otel_context.detach(otel_token)
            span.end()

    def _metrics(self, method: str, route: str, status: int) -> tuple[Any, Any]:
        """The labelled children of the request metrics, looked up once per label set (the
        set is what Prometheus keeps anyway)."""
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            children = (HTTP_REQUESTS.labels(self.service, method, route, str(status)),
                        HTTP_LATENCY.labels(self.service, method, route))
            self._children[key] = children
        return children

    @staticmethod
    async def _too_large(send: Send, rid: str, limit: int) -> None:
        body = problem_bytes(
            413, "payload_too_large", "Payload too large",
            f"request body exceeds the limit of {limit} bytes",
        )
        await send({
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", PROBLEM_CONTENT_TYPE.encode()),
                (b"content-length", str(len(body)).encode()),
                (b"x-request-id", rid.encode()),
                (b"connection", b"close"),
            ],
        })
        await send({"type": "http.response.body", "body": body})
