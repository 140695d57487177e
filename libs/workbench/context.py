"""Per-request context (request id, trace context, caller credentials) carried in contextvars,
so that logs, events and outgoing service calls pick it up without passing it by hand."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RequestContext:
    request_id: str
    traceparent: str | None = None
    authorization: str | None = None
    client_ip: str | None = None


_current: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "wb_request_context", default=None
)


def current() -> RequestContext | None:
    """The context of the request being served, or None outside a request."""
    return _current.get()


def bind(ctx: RequestContext) -> contextvars.Token[RequestContext | None]:
    return _current.set(ctx)


def reset(token: contextvars.Token[RequestContext | None]) -> None:
    _current.reset(token)


def outgoing_headers() -> dict[str, str]:
    """Headers an outgoing service call carries on: request id, trace context and the caller's
    own credentials (each service verifies them again)."""
    ctx = _current.get()
    if ctx is None:
        return {}
    headers = {"x-request-id": ctx.request_id}
    if ctx.traceparent:
        headers["traceparent"] = ctx.traceparent
    if ctx.authorization:
        headers["authorization"] = ctx.authorization
    return headers
