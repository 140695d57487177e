"""Rate limits against real Redis: the Lua counter directly, one budget shared by two gateway
processes end to end, and the local fallback (never no limit) when Redis goes away."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Platform
from workbench.ratelimit import Decision, Rate, RedisRateLimiter
from workbench.testing import (
    ApiUser,
    RedisServer,
    ServerProcess,
    free_port,
    register,
    unique,
    wait_http,
)

REDIS_URL = "redis://127.0.0.1:6379/0"
WB = [sys.executable, "-m", "services.cli"]
WINDOW_S = 60


def window_wait(room_s: float, window_s: int = WINDOW_S) -> float:
    """Windows are aligned to multiples of `window_s`: with less than `room_s` left in this one,
    how long to sleep into the next so a burst is counted in one window."""
    left = window_s - time.time() % window_s
    return left + 0.05 if left < room_s else 0.0


@contextlib.asynccontextmanager
async def limiter_in_a_fresh_window(room_s: float = 3.0) -> AsyncIterator[RedisRateLimiter]:
    """A limiter on the shared Redis, started where a burst fits in one window."""
    await asyncio.sleep(window_wait(room_s))
    limiter = RedisRateLimiter(REDIS_URL)
    try:
        yield limiter
    finally:
        await limiter.close()


def start_gateway(platform: Platform, workdir: Path, **env: str) -> tuple[str, ServerProcess]:
    port = free_port()
    proc = ServerProcess([*WB, "serve", "gateway", "--port", str(port)],
                         env={**platform.env, **env},
                         log=workdir / f"gateway-{port}.log").start()
    return f"http://127.0.0.1:{port}", proc


def problem_headers_ok(r: httpx.Response, limit: int) -> None:
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    assert int(r.headers["retry-after"]) >= 1
    assert r.headers["ratelimit-limit"] == str(limit)
    assert r.headers["ratelimit-remaining"] == "0"
    body = r.json()
    assert body["status"] == 429


# ---- the limiter itself, on the shared Redis ------------------------------------------------


async def test_redis_limiter_allows_exactly_the_limit_then_denies_with_retry_after() -> None:
    rate = Rate(25, WINDOW_S)
    key = unique("rl-seq-")
    async with limiter_in_a_fresh_window(2.0) as limiter:
        decisions = [await limiter.acquire(key, rate) for _ in range(30)]
        assert not limiter.degraded
    assert [d.allowed for d in decisions] == [True] * 25 + [False] * 5
    assert [d.remaining for d in decisions[:25]] == list(range(24, -1, -1))
    for d in decisions[25:]:
        headers = dict(d.headers())
        assert int(headers[b"retry-after"]) >= 1
        assert headers[b"ratelimit-limit"] == b"25"
        assert headers[b"ratelimit-remaining"] == b"0"
        assert 1 <= d.reset_s <= WINDOW_S
    assert all(b"retry-after" not in dict(d.headers()) for d in decisions[:25])


async def test_two_limiters_on_one_key_share_one_budget_under_concurrency() -> None:
    await asyncio.sleep(window_wait(3.0))
    a, b = RedisRateLimiter(REDIS_URL), RedisRateLimiter(REDIS_URL)
    rate = Rate(25, WINDOW_S)
    key = unique("rl-conc-")
    try:
        decisions = await asyncio.gather(
            *((a if i % 2 else b).acquire(key, rate) for i in range(10 * rate.limit)))
    finally:
        await a.close()
        await b.close()
    allowed = sum(d.allowed for d in decisions)
    assert allowed == rate.limit, (
        f"{allowed} of {len(decisions)} allowed with a limit of {rate.limit}: a burst of "
        "concurrent calls made a limiter fall back to its local budget")
    # One atomic counter: every allowed request saw a different count.
    assert sorted(d.remaining for d in decisions if d.allowed) == list(range(rate.limit))


async def test_a_burst_goes_to_redis_as_one_pipelined_batch_on_one_connection() -> None:
    rate = Rate(100, WINDOW_S)
    key = unique("rl-burst-")
    async with limiter_in_a_fresh_window() as limiter:
        decisions = await asyncio.gather(*(limiter.acquire(key, rate) for _ in range(500)))
        assert not limiter.degraded
        assert len(limiter._idle) == 1  # one connection carried the whole burst (< max_batch)
    assert sum(d.allowed for d in decisions) == rate.limit
    # Answers come back in the order asked: the first hundred callers got the budget.
    assert [d.remaining for d in decisions[:100]] == list(range(99, -1, -1))
    assert not any(d.allowed for d in decisions[100:])


async def test_a_flushed_script_is_given_again_within_a_batch() -> None:
    rate = Rate(25, WINDOW_S)
    key = unique("rl-noscript-")
    async with limiter_in_a_fresh_window() as limiter:
        await limiter.acquire(unique("rl-warm-"), rate)  # the script is known ...
        await limiter._redis.script_flush()  # ... and then forgotten, as after a restart
        decisions = await asyncio.gather(*(limiter.acquire(key, rate) for _ in range(40)))
        assert not limiter.degraded
        again = await limiter.acquire(key, rate)
    assert [d.allowed for d in decisions] == [True] * 25 + [False] * 15
    assert not again.allowed and again.remaining == 0


async def test_a_caller_that_gives_up_does_not_cost_the_others_their_answers() -> None:
    rate = Rate(25, WINDOW_S)
    key = unique("rl-cancel-")
    async with limiter_in_a_fresh_window() as limiter:
        tasks = [asyncio.create_task(limiter.acquire(key, rate)) for _ in range(10)]
        await asyncio.sleep(0)  # all ten asked; the batch is on its way
        tasks[3].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(done[3], asyncio.CancelledError)
        assert not limiter.degraded
        after = await limiter.acquire(key, rate)
    answered = [d for i, d in enumerate(done) if i != 3]
    assert all(isinstance(d, Decision) and d.allowed for d in answered)
    # The cancelled call was counted (it was sent): the next one is the eleventh.
    assert after.remaining == rate.limit - 11


# ---- end to end: two gateway processes, one budget --------------------------------------------

E2E_LIMIT = 20


@pytest.fixture(scope="module")
def two_gateways(distributed_platform: Platform,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    workdir = tmp_path_factory.mktemp("rl-gateways")
    started = [start_gateway(distributed_platform, workdir,
                             WB_RATE_LIMIT_AUTHENTICATED=f"{E2E_LIMIT}/{WINDOW_S}")
               for _ in range(2)]
    try:
        for url, proc in started:
            wait_http(url + "/readyz", proc=proc.proc, log=proc.log)
        yield [url for url, _ in started]
    finally:
        for _, proc in started:
            proc.stop()


def signed_in_user(platform: Platform) -> ApiUser:
    with platform.client() as c:
        return register(c)


async def test_two_gateways_share_one_budget_per_user(distributed_platform: Platform,
                                                      two_gateways: list[str]) -> None:
    user = signed_in_user(distributed_platform)
    await asyncio.sleep(window_wait(8.0))
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=30.0, limits=limits) as client:
        responses = await asyncio.gather(*(
            client.get(f"{two_gateways[i % 2]}/api/v1/auth/me", headers=user.headers)
            for i in range(200)))
    by_status: dict[int, int] = {}
    for r in responses:
        by_status[r.status_code] = by_status.get(r.status_code, 0) + 1
    assert by_status == {200: E2E_LIMIT, 429: 200 - E2E_LIMIT}, by_status
    ok = [r for r in responses if r.status_code == 200]
    assert all(r.json()["user"]["id"] == user.user_id for r in ok)
    assert all(r.headers["ratelimit-limit"] == str(E2E_LIMIT) for r in ok)
    # One shared counter: every admitted request saw a different count.
    assert sorted(int(r.headers["ratelimit-remaining"]) for r in ok) == list(range(E2E_LIMIT))
    for r in responses:
        if r.status_code == 429:
            problem_headers_ok(r, E2E_LIMIT)
    # Both gateways admitted and refused requests (the split really happened).
    for url in two_gateways:
        mine = [r for r in responses if str(r.request.url).startswith(url)]
        assert len(mine) == 100


# ---- Redis down: local limits, readiness says so ----------------------------------------------


def test_gateway_falls_back_to_local_limit_when_redis_is_down(
        distributed_platform: Platform, tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis").start()
    url, gw = start_gateway(distributed_platform, tmp_path, WB_REDIS_URL=redis.url,
                            WB_RATE_LIMIT_AUTHENTICATED=f"10/{WINDOW_S}")
    try:
        wait_http(url + "/readyz", proc=gw.proc, log=gw.log)
        user = signed_in_user(distributed_platform)
        redis.stop()
        time.sleep(window_wait(3.0))
        with httpx.Client(base_url=url, timeout=30.0) as c:
            statuses = []
            for _ in range(15):
                r = c.get("/api/v1/auth/me", headers=user.headers)
                statuses.append(r.status_code)
                if r.status_code == 429:
                    problem_headers_ok(r, 10)
            assert statuses == [200] * 10 + [429] * 5
            ready = c.get("/readyz")
        assert ready.status_code == 503
        checks = ready.json()["checks"]
        assert checks["redis"].startswith("failed"), checks
        assert checks["upstream:user"] == "ok"
    finally:
        gw.stop()
        redis.stop()
