"""ServiceClient against a real uvicorn server on 127.0.0.1: context propagation, retries,
circuit breaker, timeouts, problem+json mapping, and the in-process ASGI transport."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from workbench import context
from workbench.client import (
    BreakerState,
    CircuitBreaker,
    ServiceClient,
    raise_for_problem,
)
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

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@dataclass
class Upstream:
    """What the test server saw and how it should answer, keyed per test so tests don't mix."""

    hits: Counter[str] = field(default_factory=Counter)
    failing: set[str] = field(default_factory=set)


def build_app(state: Upstream) -> FastAPI:
    app = FastAPI()

    @app.get("/headers")
    async def headers(request: Request) -> dict[str, str | None]:
        return {
            name: request.headers.get(name)
            for name in ("x-request-id", "traceparent", "authorization", "x-extra")
        }

    @app.api_route("/flaky/{key}", methods=["GET", "POST", "PUT"])
    async def flaky(
        key: str, failures: int = 2, retry_after: str | None = None
    ) -> Response:
        state.hits[key] += 1
        if state.hits[key] <= failures:
            extra = {"retry-after": retry_after} if retry_after is not None else {}
            return JSONResponse(
                {"detail": "warming up"}, status_code=503, headers=extra
            )
        return JSONResponse({"attempts": state.hits[key]})

    @app.get("/switch/{key}")
    async def switch(key: str) -> Response:
        # Fails with 500 while the test keeps `key` in `failing`.
        state.hits[key] += 1
        if key in state.failing:
            return JSONResponse({"detail": "boom"}, status_code=500)
        return JSONResponse({"ok": True})

    @app.api_route("/slow/{key}", methods=["GET", "POST"])
    async def slow(key: str, seconds: float = 0.5) -> dict[str, bool]:
        state.hits[key] += 1
        await asyncio.sleep(seconds)
        return {"ok": True}

    @app.get("/problem/{status}")
    async def problem(status: int, code: str = "some_code") -> Response:
        body = {
            "type": "about:blank",
            "title": "whatever",
            "status": status,
            "detail": f"detail for {status}",
            "code": code,
            "request_id": "r-1",
        }
        if status == 422:
            body["errors"] = [{"field": "name", "message": "required"}]
        return JSONResponse(
            body,
            status_code=status,
            media_type="application/problem+json",
            headers={"retry-after": "7"} if status == 429 else None,
        )

    return app


@dataclass
class LiveServer:
    url: str
    state: Upstream


@pytest.fixture(scope="module")
def live_server() -> Iterator[LiveServer]:
    """A real uvicorn server in a thread with its own event loop, shared by the module."""
    state = Upstream()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        build_app(state),
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 5
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    yield LiveServer(f"http://127.0.0.1:{port}", state)
    server.should_exit = True
    thread.join(timeout=5)
    sock.close()


@pytest.fixture
async def client(live_server: LiveServer) -> AsyncIterator[ServiceClient]:
    async with ServiceClient("kb", live_server.url, backoff_s=0.01) as c:
        yield c


def dead_port() -> int:
    # Bound and closed again: nothing listens there, so connecting is refused at once.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def state_of(breaker: CircuitBreaker) -> BreakerState:
    # Read through a call: mypy would otherwise keep the property narrowed from an earlier assert.
    return breaker.state


# --- propagation -------------------------------------------------------------------------


async def test_request_context_reaches_the_called_service(
    client: ServiceClient,
) -> None:
    token = context.bind(
        context.RequestContext(
            request_id="req-123",
            traceparent=TRACEPARENT,
            authorization="Bearer user-token",
        )
    )
    try:
        resp = await client.get("/headers", headers={"X-Extra": "1"})
    finally:
        context.reset(token)

    assert resp.json() == {
        "x-request-id": "req-123",
        "traceparent": TRACEPARENT,
        "authorization": "Bearer user-token",
        "x-extra": "1",
    }


async def test_explicit_headers_override_the_request_context(
    client: ServiceClient,
) -> None:
    token = context.bind(
        context.RequestContext(request_id="req-1", authorization="Bearer user")
    )
    try:
        resp = await client.get("/headers", headers={"Authorization": "Bearer service"})
    finally:
        context.reset(token)

    assert resp.json()["authorization"] == "Bearer service"
    assert resp.json()["x-request-id"] == "req-1"


async def test_call_outside_a_request_gets_a_fresh_request_id(
    client: ServiceClient,
) -> None:
    first = (await client.get("/headers")).json()
    second = (await client.get("/headers")).json()

    assert len(first["x-request-id"]) == 32
    assert first["x-request-id"] != second["x-request-id"]
    assert first["traceparent"] is None
    assert first["authorization"] is None


# --- retries -----------------------------------------------------------------------------


async def test_get_is_retried_through_two_503s(
    client: ServiceClient, live_server: LiveServer
) -> None:
    resp = await client.get("/flaky/get")

    assert resp.status_code == 200
    assert resp.json() == {"attempts": 3}
    assert live_server.state.hits["get"] == 3


async def test_post_is_not_retried_on_503(
    client: ServiceClient, live_server: LiveServer
) -> None:
    resp = await client.post("/flaky/post", json={"a": 1})

    assert resp.status_code == 503
    assert resp.json() == {"detail": "warming up"}
    assert live_server.state.hits["post"] == 1


async def test_post_marked_idempotent_is_retried(
    client: ServiceClient, live_server: LiveServer
) -> None:
    resp = await client.post(
        "/flaky/post-idem",
        json={"a": 1},
        headers={"idempotency-key": "k1"},
        idempotent=True,
    )

    assert resp.json() == {"attempts": 3}
    assert live_server.state.hits["post-idem"] == 3


async def test_get_marked_not_idempotent_is_not_retried(
    client: ServiceClient, live_server: LiveServer
) -> None:
    resp = await client.get("/flaky/get-once", idempotent=False)

    assert resp.status_code == 503
    assert live_server.state.hits["get-once"] == 1


async def test_503_left_after_retries_is_returned_not_raised(
    client: ServiceClient, live_server: LiveServer
) -> None:
    resp = await client.get("/flaky/always", params={"failures": 100})

    assert resp.status_code == 503
    assert live_server.state.hits["always"] == 3  # 1 try + 2 retries


async def test_retry_after_is_honoured_only_up_to_the_cap(
    live_server: LiveServer,
) -> None:
    async with ServiceClient(
        "kb", live_server.url, backoff_s=0.001, retry_after_cap_s=0.2
    ) as client:
        started = time.monotonic()
        resp = await client.get(
            "/flaky/ra", params={"failures": 1, "retry_after": "3600"}
        )
        elapsed = time.monotonic() - started

    assert resp.json() == {"attempts": 2}
    assert 0.2 <= elapsed < 1.0


async def test_refused_connection_raises_service_unavailable_after_retries() -> None:
    port = dead_port()
    async with ServiceClient(
        "kb", f"http://127.0.0.1:{port}", backoff_s=0.01
    ) as client:
        with pytest.raises(ServiceUnavailable) as caught:
            await client.get("/anything")

    err = caught.value
    assert err.code == "upstream_unavailable"
    assert "'kb'" in err.detail
    assert "ConnectError" in err.detail
    assert "after 3 attempts" in err.detail
    assert state_of(client.breaker) is BreakerState.CLOSED  # 3 failures < threshold 5


async def test_refused_post_is_retried_since_nothing_was_sent() -> None:
    async with ServiceClient(
        "kb", f"http://127.0.0.1:{dead_port()}", backoff_s=0.01
    ) as client:
        with pytest.raises(ServiceUnavailable) as caught:
            await client.post("/anything", json={})

    assert "after 3 attempts" in caught.value.detail


# --- timeouts ----------------------------------------------------------------------------


async def test_slow_get_times_out_into_service_unavailable(
    live_server: LiveServer,
) -> None:
    async with ServiceClient(
        "kb", live_server.url, timeout=0.1, retries=1, backoff_s=0.01
    ) as client:
        with pytest.raises(ServiceUnavailable) as caught:
            await client.get("/slow/slow-get", params={"seconds": 0.5})

    assert caught.value.code == "upstream_unavailable"
    assert "timeout (ReadTimeout)" in caught.value.detail
    assert "after 2 attempts" in caught.value.detail
    assert live_server.state.hits["slow-get"] == 2


async def test_timed_out_post_is_not_sent_twice(live_server: LiveServer) -> None:
    async with ServiceClient(
        "kb", live_server.url, timeout=0.1, backoff_s=0.01
    ) as client:
        with pytest.raises(ServiceUnavailable) as caught:
            await client.post("/slow/slow-post", params={"seconds": 0.5})

    assert "after 1 attempt" in caught.value.detail
    assert live_server.state.hits["slow-post"] == 1


async def test_read_timeout_override_lets_a_slow_call_finish(
    live_server: LiveServer,
) -> None:
    async with ServiceClient("kb", live_server.url, timeout=0.05) as client:
        resp = await client.get(
            "/slow/slow-long", params={"seconds": 0.2}, read_timeout=2.0
        )

    assert resp.json() == {"ok": True}


# --- circuit breaker ---------------------------------------------------------------------


async def test_breaker_opens_fails_fast_then_half_opens_and_closes(
    live_server: LiveServer,
) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout_s=10.0, clock=clock)
    state = live_server.state
    state.failing.add("brk")
    async with ServiceClient(
        "kb", live_server.url, retries=0, breaker=breaker
    ) as client:
        for _ in range(3):
            assert (await client.get("/switch/brk")).status_code == 500
        assert state_of(breaker) is BreakerState.OPEN

        with pytest.raises(ServiceUnavailable) as caught:
            await client.get("/switch/brk")
        assert caught.value.code == "circuit_open"
        assert "'kb'" in caught.value.detail
        assert caught.value.headers["retry-after"] == "10"
        assert state.hits["brk"] == 3  # failed fast: the server never saw the 4th call

        clock.now += 10.0
        assert state_of(breaker) is BreakerState.HALF_OPEN
        state.failing.discard("brk")
        resp = await client.get("/switch/brk")

        assert resp.json() == {"ok": True}
        assert state.hits["brk"] == 4
        assert state_of(breaker) is BreakerState.CLOSED


async def test_failed_trial_call_opens_the_breaker_again(
    live_server: LiveServer,
) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout_s=5.0, clock=clock)
    state = live_server.state
    state.failing.add("trial")
    async with ServiceClient(
        "kb", live_server.url, retries=0, breaker=breaker
    ) as client:
        for _ in range(2):
            await client.get("/switch/trial")
        clock.now += 5.0

        assert (await client.get("/switch/trial")).status_code == 500  # the trial call
        assert state_of(breaker) is BreakerState.OPEN
        with pytest.raises(ServiceUnavailable):
            await client.get("/switch/trial")

    assert state.hits["trial"] == 3


async def test_breaker_stops_retries_once_it_opens(live_server: LiveServer) -> None:
    breaker = CircuitBreaker(failure_threshold=2, clock=FakeClock())
    async with ServiceClient(
        "kb", live_server.url, retries=5, backoff_s=0.001, breaker=breaker
    ) as client:
        with pytest.raises(ServiceUnavailable) as caught:
            await client.get("/flaky/brk-retry", params={"failures": 100})

    assert caught.value.code == "circuit_open"
    assert live_server.state.hits["brk-retry"] == 2


async def test_4xx_answers_count_as_healthy(live_server: LiveServer) -> None:
    breaker = CircuitBreaker(failure_threshold=1, clock=FakeClock())
    async with ServiceClient(
        "kb", live_server.url, retries=0, breaker=breaker
    ) as client:
        for _ in range(3):
            assert (await client.get("/problem/404")).status_code == 404

    assert state_of(breaker) is BreakerState.CLOSED


def test_half_open_breaker_lets_exactly_one_trial_through() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout_s=1.0, clock=clock)
    breaker.record_failure()
    assert not breaker.allow()

    clock.now += 1.0
    assert breaker.allow()
    assert not breaker.allow()  # a second caller while the trial is in flight
    breaker.release()  # the trial was cancelled: no verdict, someone else may try
    assert breaker.allow()
    breaker.record_success()
    assert state_of(breaker) is BreakerState.CLOSED
    assert breaker.allow()
    assert breaker.allow()


async def test_cancelled_trial_call_frees_the_trial_slot(
    live_server: LiveServer,
) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout_s=1.0, clock=clock)
    breaker.record_failure()
    clock.now += 1.0
    async with ServiceClient("kb", live_server.url, breaker=breaker) as client:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await client.get("/slow/slow-cancel", params={"seconds": 0.3})

        assert state_of(breaker) is BreakerState.HALF_OPEN
        assert (await client.get("/headers")).status_code == 200
    assert state_of(breaker) is BreakerState.CLOSED


# --- problem+json mapping ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (400, "bad_input", BadRequest),
        (401, "token_expired", Unauthorized),
        (403, "forbidden", Forbidden),
        (404, "dataset_not_found", NotFound),
        (405, "method_not_allowed", BadRequest),
        (409, "conflict", Conflict),
        (413, "payload_too_large", PayloadTooLarge),
        (422, "validation_failed", ValidationFailed),
        (429, "quota_exceeded", QuotaExceeded),
        (429, "rate_limited", RateLimited),
        (500, "internal_error", UpstreamError),
        (503, "db_down", UpstreamError),
    ],
)
async def test_problem_response_raises_the_matching_error(
    client: ServiceClient, status: int, code: str, expected: type[WorkbenchError]
) -> None:
    resp = await client.get(
        f"/problem/{status}", params={"code": code}, idempotent=False
    )

    with pytest.raises(WorkbenchError) as caught:
        raise_for_problem(resp)

    err = caught.value
    assert type(err) is expected
    assert err.detail == f"detail for {status}"
    if status < 500:
        assert err.code == code
    else:
        assert err.code == "upstream_error"
        assert err.extra == {"upstream_status": status, "upstream_code": code}


async def test_problem_mapping_keeps_field_errors_and_retry_after(
    client: ServiceClient,
) -> None:
    with pytest.raises(ValidationFailed) as invalid:
        raise_for_problem(await client.get("/problem/422"))
    with pytest.raises(RateLimited) as limited:
        raise_for_problem(await client.get("/problem/429"))
    with pytest.raises(Unauthorized) as unauthorized:
        raise_for_problem(await client.get("/problem/401"))

    assert invalid.value.extra == {"errors": [{"field": "name", "message": "required"}]}
    assert limited.value.headers == {"retry-after": "7"}
    assert unauthorized.value.headers["www-authenticate"].startswith("Bearer")


def test_success_and_non_problem_error_responses() -> None:
    raise_for_problem(httpx.Response(204))  # no error: returns quietly

    with pytest.raises(UpstreamError) as caught:
        raise_for_problem(httpx.Response(502, text="upstream connect error"))
    assert caught.value.detail == "HTTP 502 Bad Gateway: upstream connect error"


# --- in-process (embedded mode) ----------------------------------------------------------


async def test_asgi_transport_calls_an_in_process_app() -> None:
    state = Upstream()
    transport = httpx.ASGITransport(app=build_app(state))
    token = context.bind(
        context.RequestContext(request_id="req-asgi", traceparent=TRACEPARENT)
    )
    try:
        async with ServiceClient(
            "kb", "http://kb", transport=transport, backoff_s=0.001
        ) as client:
            headers = (await client.get("/headers")).json()
            flaky = await client.get("/flaky/asgi")
    finally:
        context.reset(token)

    assert headers["x-request-id"] == "req-asgi"
    assert headers["traceparent"] == TRACEPARENT
    assert flaky.json() == {"attempts": 3}
    assert state.hits["asgi"] == 3
