"""Fixed-window rate limits: atomic in Redis (one Lua call, no read-then-write race) so every
gateway replica shares one budget, in memory in embedded mode, and a local limit — never no
limit — while Redis is unreachable."""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

log = logging.getLogger("workbench.ratelimit")

_LUA = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
"""


@dataclass(frozen=True)
class Rate:
    limit: int
    window_s: int

    @classmethod
    def parse(cls, text: str) -> Rate:
        """'600/60' = 600 requests per 60 seconds; '100/1m', '5000/1h' also read."""
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d*)\s*([smh]?)\s*", text)
        if not m or int(m.group(1)) < 1:
            raise ValueError(f"rate {text!r} is not of the form N/SECONDS (e.g. 600/60)")
        window = int(m.group(2) or 1) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(3)]
        if window < 1:
            raise ValueError(f"rate {text!r} has an empty window")
        return cls(int(m.group(1)), window)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_s: int  # seconds until the window resets

    def headers(self) -> list[tuple[bytes, bytes]]:
        out = [
            (b"ratelimit-limit", str(self.limit).encode()),
            (b"ratelimit-remaining", str(self.remaining).encode()),
            (b"ratelimit-reset", str(self.reset_s).encode()),
        ]
        if not self.allowed:
            out.append((b"retry-after", str(max(1, self.reset_s)).encode()))
        return out


def _decide(count: int, rate: Rate, now: float) -> Decision:
    window_end = (math.floor(now / rate.window_s) + 1) * rate.window_s
    return Decision(
        allowed=count <= rate.limit,
        limit=rate.limit,
        remaining=max(0, rate.limit - count),
        reset_s=max(1, math.ceil(window_end - now)),
    )


class RateLimiter(Protocol):
    async def acquire(self, key: str, rate: Rate) -> Decision: ...

    async def close(self) -> None: ...


class MemoryRateLimiter:
    def __init__(self, max_keys: int = 100_000) -> None:
        self._counts: dict[tuple[str, int, int], int] = {}
        self._max_keys = max_keys

    async def acquire(self, key: str, rate: Rate) -> Decision:
        now = time.time()
        window = int(now // rate.window_s)
        k = (key, rate.window_s, window)
        count = self._counts.get(k, 0) + 1
        self._counts[k] = count
        if len(self._counts) > self._max_keys:
            self._evict(now)
        return _decide(count, rate, now)

    def _evict(self, now: float) -> None:
        for k in [k for k in self._counts if (k[2] + 1) * k[1] < now]:
            del self._counts[k]
        if len(self._counts) > self._max_keys:
            self._counts.clear()

    async def close(self) -> None:
        self._counts.clear()


class RedisRateLimiter:
    """Shared budget in Redis; on a Redis error it falls back to `fallback` for `retry_s`
    before trying Redis again."""

    def __init__(self, url: str, *, prefix: str = "wb:rl", retry_s: float = 5.0,
                 timeout_s: float = 0.5, max_connections: int = 64) -> None:
        # A blocking pool: a burst waits briefly for a connection instead of failing, and a
        # full pool is never mistaken for Redis being down.
        pool = BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout_s * 4,
            socket_timeout=timeout_s, socket_connect_timeout=timeout_s * 2)
        self._redis = Redis(connection_pool=pool)
        self._script = self._redis.register_script(_LUA)
        self._prefix = prefix
        self._fallback = MemoryRateLimiter()
        self._retry_s = retry_s
        self._down_until = 0.0
        self.degraded = False

    async def acquire(self, key: str, rate: Rate) -> Decision:
        now = time.time()
        if now >= self._down_until:
            window = int(now // rate.window_s)
            rkey = f"{self._prefix}:{key}:{rate.window_s}:{window}"
            try:
                count = int(await self._script(keys=[rkey], args=[rate.window_s * 1000 + 1000]))
                if self.degraded:
                    log.info("rate limiter: Redis is back; shared limits restored")
                    self.degraded = False
                return _decide(count, rate, now)
            except (RedisError, OSError) as exc:
                self._down_until = now + self._retry_s
                if not self.degraded:
                    log.warning("rate limiter: Redis unreachable (%s); using local limits", exc)
                self.degraded = True
        return await self._fallback.acquire(key, rate)

    async def ping(self) -> None:
        await self._redis.ping()

    async def close(self) -> None:
        await self._redis.aclose()
