"""Typed domain errors. Services raise these; the app factory renders them as RFC 9457
problem+json. No HTTP types are needed to raise one."""

from __future__ import annotations

from typing import Any


class WorkbenchError(Exception):
    """Base of every error a client may see. `code` is stable and machine-readable."""

    status: int = 400
    code: str = "bad_request"
    title: str = "Bad request"

    def __init__(
        self,
        detail: str,
        *,
        code: str | None = None,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        self.extra = extra or {}
        self.headers = headers or {}


class BadRequest(WorkbenchError):
    pass


class ValidationFailed(WorkbenchError):
    status = 422
    code = "validation_failed"
    title = "Validation failed"


class Unauthorized(WorkbenchError):
    status = 401
    code = "unauthorized"
    title = "Unauthorized"

    def __init__(self, detail: str = "authentication required", **kw: Any) -> None:
        kw.setdefault("headers", {"www-authenticate": 'Bearer realm="xai-workbench"'})
        super().__init__(detail, **kw)


class Forbidden(WorkbenchError):
    status = 403
    code = "forbidden"
    title = "Forbidden"


class NotFound(WorkbenchError):
    status = 404
    code = "not_found"
    title = "Not found"


class Conflict(WorkbenchError):
    status = 409
    code = "conflict"
    title = "Conflict"


class PayloadTooLarge(WorkbenchError):
    status = 413
    code = "payload_too_large"
    title = "Payload too large"


class QuotaExceeded(WorkbenchError):
    status = 429
    code = "quota_exceeded"
    title = "Quota exceeded"


class RateLimited(WorkbenchError):
    status = 429
    code = "rate_limited"
    title = "Too many requests"


class ServiceUnavailable(WorkbenchError):
    status = 503
    code = "service_unavailable"
    title = "Service unavailable"


class UpstreamError(WorkbenchError):
    status = 502
    code = "upstream_error"
    title = "Bad gateway"
