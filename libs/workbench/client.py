"""ServiceClient: the one way services call each other over HTTP, with timeouts, retries of
idempotent calls, a circuit breaker, and the caller's request context passed on."""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import random
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, NoReturn, Self

import httpx

from workbench import context
from workbench.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    QuotaExceeded,
    RateLimited,
    ServiceUnavailable,
    Unauthorized,
    UpstreamError,
    ValidationFailed,
    WorkbenchError,
)

__all__ = ["BreakerState", "CircuitBreaker", "ServiceClient", "raise_for_problem"]

log = logging.getLogger(__name__)

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
RETRY_STATUSES = frozenset({502, 503, 504})
# One backoff step never grows past this, however many retries are configured.
MAX_BACKOFF_S = 2.0
# Problem+json members that map onto WorkbenchError fields; any other member (e.g. the field
# list of a 422) is carried over in `extra` so it survives the hop back to the end user.
_PROBLEM_MEMBERS = frozenset(
    {"type", "title", "status", "detail", "code", "request_id"}
)
_MAX_DETAIL_CHARS = 500


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Stops calling a service that keeps failing: opens after `failure_threshold` consecutive
    failures, lets one trial call through after `reset_timeout_s`, and closes when it succeeds.

    Not thread-safe; it lives on one event loop like the client that uses it."""

    def __init__(
        self,
        failure_threshold: int = 5,
        reset_timeout_s: float = 10.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial_in_flight = False

    @property
    def state(self) -> BreakerState:
        # Report half-open as soon as the timeout has passed, not only after the next call.
        if self._state is BreakerState.OPEN and self.retry_in() == 0.0:
            return BreakerState.HALF_OPEN
        return self._state

    def retry_in(self) -> float:
        """Seconds until an open breaker lets a trial call through (0 when it would now)."""
        if self._state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.reset_timeout_s - self._clock())

    def allow(self) -> bool:
        """Whether a call may go out now. In half-open exactly one caller gets True, and it
        must report the outcome with record_success/record_failure (or release)."""
        if self._state is BreakerState.OPEN:
            if self.retry_in() > 0.0:
                return False
            self._state = BreakerState.HALF_OPEN
            self._trial_in_flight = False
        if self._state is BreakerState.HALF_OPEN:
            if self._trial_in_flight:
                return False
            self._trial_in_flight = True
        return True

    def record_success(self) -> None:
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._trial_in_flight = False

    def record_failure(self) -> None:
        if self._state is BreakerState.OPEN:
            # A call sent before the breaker opened; re-stamping would keep it open longer.
            return
        self._failures += 1
        if (
            self._state is BreakerState.HALF_OPEN
            or self._failures >= self.failure_threshold
        ):
            self._state = BreakerState.OPEN
            self._opened_at = self._clock()
            self._trial_in_flight = False

    def release(self) -> None:
        """A call ended without a verdict (cancelled, or failed before reaching the network):
        free the half-open trial slot so that the next caller can make the trial instead."""
        self._trial_in_flight = False


class ServiceClient:
    """An HTTP client for one other service, created once in the lifespan and closed there.

    request() returns the response for any HTTP status (use raise_for_problem to turn an error
    response into a typed error) and raises ServiceUnavailable when the service could not be
    reached: circuit open (code "circuit_open") or retries exhausted ("upstream_unavailable")."""

    def __init__(
        self,
        name: str,
        base_url: str,
        *,
        timeout: float = 10.0,
        connect_timeout: float = 2.0,
        retries: int = 2,
        backoff_s: float = 0.05,
        retry_after_cap_s: float = 5.0,
        breaker: CircuitBreaker | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        default_headers: dict[str, str] | None = None,
    ) -> None:
        if retries < 0:
            raise ValueError("retries must not be negative")
        self.name = name
        self.retries = retries
        self.backoff_s = backoff_s
        self.retry_after_cap_s = retry_after_cap_s
        # Every service call is guarded; pass a breaker only to tune it or share it.
        self.breaker = breaker if breaker is not None else CircuitBreaker()
        self._default_headers = _lower_keys(default_headers or {})
        self._http = httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            transport=transport,
            # Other services are reached by configured URLs; proxies from the environment would
            # only reroute internal traffic.
            trust_env=False,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def get(
        self,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool | None = None,
        read_timeout: float | None = None,
    ) -> httpx.Response:
        return await self.request(
            "GET",
            path,
            params=params,
            headers=headers,
            idempotent=idempotent,
            read_timeout=read_timeout,
        )

    async def post(
        self,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        content: bytes | str | None = None,
        idempotent: bool | None = None,
        read_timeout: float | None = None,
    ) -> httpx.Response:
        return await self.request(
            "POST",
            path,
            json=json,
            params=params,
            headers=headers,
            content=content,
            idempotent=idempotent,
            read_timeout=read_timeout,
        )

    async def put(
        self,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        content: bytes | str | None = None,
        idempotent: bool | None = None,
        read_timeout: float | None = None,
    ) -> httpx.Response:
        return await self.request(
            "PUT",
            path,
            json=json,
            params=params,
            headers=headers,
            content=content,
            idempotent=idempotent,
            read_timeout=read_timeout,
        )

    async def patch(
        self,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        content: bytes | str | None = None,
        idempotent: bool | None = None,
        read_timeout: float | None = None,
    ) -> httpx.Response:
        return await self.request(
            "PATCH",
            path,
            json=json,
            params=params,
            headers=headers,
            content=content,
            idempotent=idempotent,
            read_timeout=read_timeout,
        )

    async def delete(
        self,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool | None = None,
        read_timeout: float | None = None,
    ) -> httpx.Response:
        return await self.request(
            "DELETE",
            path,
            params=params,
            headers=headers,
            idempotent=idempotent,
            read_timeout=read_timeout,
        )

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        content: bytes | str | None = None,
        idempotent: bool | None = None,
        read_timeout: float | None = None,
    ) -> httpx.Response:
        """Call the service. `idempotent=True` allows retries of e.g. a POST that carries an
        idempotency key; `False` forbids them even for a GET. `read_timeout` overrides the
        client's timeout for each attempt of this call (for long-running endpoints)."""
        method = method.upper()
        if idempotent is None:
            idempotent = method in IDEMPOTENT_METHODS
        # Built once so that every attempt carries the same body and the same request id.
        req = self._http.build_request(
            method,
            path,
            json=json,
            params=params,
            content=content,
            headers=self._headers_for(headers),
            timeout=(
                httpx.Timeout(read_timeout, connect=self._http.timeout.connect)
                if read_timeout is not None
                else httpx.USE_CLIENT_DEFAULT
            ),
        )
        attempts = self.retries + 1
        for attempt in range(1, attempts + 1):
            if not self.breaker.allow():
                self._raise_circuit_open(req)
            try:
                resp = await self._http.send(req)
            except httpx.RequestError as exc:
                self.breaker.record_failure()
                if attempt == attempts or not _may_retry(exc, idempotent=idempotent):
                    self._raise_unavailable(req, exc, attempt)
                delay = self._backoff(attempt)
                cause = _describe(exc)
            except BaseException:
                # Cancellation (the caller's deadline) says nothing about the service's health.
                self.breaker.release()
                raise
            else:
                if resp.status_code >= 500:
                    self.breaker.record_failure()
                else:
                    # A 4xx is the service answering correctly; it counts as healthy.
                    self.breaker.record_success()
                if (
                    attempt == attempts
                    or not idempotent
                    or resp.status_code not in RETRY_STATUSES
                ):
                    return resp
                delay = self._backoff(attempt)
                retry_after = _retry_after_s(resp)
                if retry_after is not None:
                    delay = max(delay, min(retry_after, self.retry_after_cap_s))
                cause = f"HTTP {resp.status_code}"
                await resp.aclose()
            log.info(
                "retrying call to %s: %s %s failed (%s), attempt %d of %d in %.3fs",
                self.name,
                method,
                req.url.path,
                cause,
                attempt + 1,
                attempts,
                delay,
            )
            await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _headers_for(self, explicit: Mapping[str, str] | None) -> dict[str, str]:
        # Precedence: client defaults < the request context < what this call passes.
        headers = {**self._default_headers, **_lower_keys(context.outgoing_headers())}
        headers.update(_lower_keys(explicit or {}))
        if "x-request-id" not in headers:
            # Outside a request (a worker, a startup task) the call still gets an id to trace.
            headers["x-request-id"] = uuid.uuid4().hex
        return headers

    def _backoff(self, attempt: int) -> float:
        # Exponential with jitter in [50%, 100%] of the step: callers that failed together
        # spread out, and no retry comes sooner than half the planned wait.
        step = min(self.backoff_s * 2.0 ** (attempt - 1), MAX_BACKOFF_S)
        return step * random.uniform(0.5, 1.0)

    def _raise_circuit_open(self, req: httpx.Request) -> NoReturn:
        wait = self.breaker.retry_in()
        raise ServiceUnavailable(
            f"service {self.name!r} is failing, calls to it are paused "
            f"(circuit open; {req.method} {req.url.path} not sent); try again in "
            f"{max(1, math.ceil(wait))}s",
            code="circuit_open",
            headers={"retry-after": str(max(1, math.ceil(wait)))},
        )

    def _raise_unavailable(
        self, req: httpx.Request, exc: httpx.RequestError, tries: int
    ) -> NoReturn:
        attempts = "1 attempt" if tries == 1 else f"{tries} attempts"
        raise ServiceUnavailable(
            f"service {self.name!r} is unavailable: {req.method} {req.url.path} failed with "
            f"{_describe(exc)} after {attempts}",
            code="upstream_unavailable",
        ) from exc


def _may_retry(exc: httpx.RequestError, *, idempotent: bool) -> bool:
    # No connection was made, so nothing was sent: safe to retry whatever the method.
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return True
    if not idempotent:
        # The request may have reached the service; doing it twice could do the work twice.
        return False
    return isinstance(
        exc, httpx.TimeoutException | httpx.NetworkError | httpx.RemoteProtocolError
    )


def _describe(exc: httpx.RequestError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"timeout ({type(exc).__name__})"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _retry_after_s(resp: httpx.Response) -> float | None:
    """Retry-After as seconds from now (delta-seconds or HTTP-date), None when absent or bad."""
    value = resp.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _lower_keys(headers: Mapping[str, str]) -> dict[str, str]:
    # HTTP header names are case-insensitive; one spelling lets later sources override earlier.
    return {k.lower(): v for k, v in headers.items()}


_BY_STATUS: dict[int, type[WorkbenchError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: ValidationFailed,
}


def raise_for_problem(resp: httpx.Response) -> None:
    """Raise the workbench error matching an error response of another service, keeping its
    detail and code; return quietly for a non-error status.

    4xx keep their class (429 by code: quota_exceeded → QuotaExceeded, else RateLimited; other
    4xx → BadRequest); every 5xx becomes UpstreamError, since to our own caller it is a bad
    gateway, not their fault."""
    status = resp.status_code
    if status < 400:
        return
    body = _problem_body(resp)
    detail = body.get("detail")
    if not isinstance(detail, str) or not detail:
        detail = _fallback_detail(resp)
    code = body.get("code") if isinstance(body.get("code"), str) else None
    extra = {k: v for k, v in body.items() if k not in _PROBLEM_MEMBERS}

    cls: type[WorkbenchError]
    headers: dict[str, str] = {}
    if status >= 500:
        # The upstream's own code ("internal_error", "db_down") means nothing to our caller.
        extra["upstream_status"] = status
        if code is not None:
            extra["upstream_code"] = code
        raise UpstreamError(detail, extra=extra)
    if status == 429:
        cls = QuotaExceeded if code == QuotaExceeded.code else RateLimited
        if "retry-after" in resp.headers:
            headers["retry-after"] = resp.headers["retry-after"]
    else:
        cls = _BY_STATUS.get(status, BadRequest)
    if status == 401 and "www-authenticate" in resp.headers:
        headers["www-authenticate"] = resp.headers["www-authenticate"]
    error = cls(detail, code=code, extra=extra)
    # Update rather than replace, so that Unauthorized keeps its default challenge.
    error.headers.update(headers)
    raise error


def _problem_body(resp: httpx.Response) -> dict[str, Any]:
    if "json" not in resp.headers.get("content-type", ""):
        return {}
    try:
        body = resp.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _fallback_detail(resp: httpx.Response) -> str:
    # A proxy or a crashed worker may answer with plain text or nothing; say what we got.
    text = resp.text.strip()[:_MAX_DETAIL_CHARS] if resp.content else ""
    reason = resp.reason_phrase or "error"
    return f"HTTP {resp.status_code} {reason}" + (f": {text}" if text else "")
