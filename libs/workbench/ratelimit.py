"""Fixed-window rate limits: atomic in Redis (one Lua call, no read-then-write race) so every
gateway replica shares one budget, in memory in embedded mode, and a local limit — never no
limit — while Redis is unreachable."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

log = logging.getLogger("workbench.ratelimit")

_LUA = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
"""
_LUA_SHA = hashlib.sha1(_LUA.encode(), usedforsecurity=False).hexdigest()  # Redis names scripts so


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
    before trying Redis again.

    Calls are pipelined: the counters asked for in one turn of the event loop go to Redis
    together — one write of their `EVALSHA`s and one read of the answers on a connection of the
    limiter's own — so a burst of a thousand concurrent requests costs one round trip, not a
    thousand connections (whose opening, on a busy machine, took longer than the timeout and
    made a burst look like Redis being down). A lone request still costs one round trip: the
    client's generic path (pool checkout with a liveness probe, retry wrapper, a task per write
    for the socket timeout) measured twice that. Up to `max_connections` batches are in flight
    at once; one beyond that waits (up to 4 x `timeout_s`) for a connection instead of failing,
    so a full pool is never mistaken for Redis being down."""

    def __init__(self, url: str, *, prefix: str = "wb:rl", retry_s: float = 5.0,
                 timeout_s: float = 0.5, max_connections: int = 64,
                 max_batch: int = 512) -> None:
        # The client proper serves readiness pings.
        pool = BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout_s * 4,
            socket_timeout=timeout_s, socket_connect_timeout=timeout_s * 2)
        self._redis = Redis(connection_pool=pool)
        # Connections for the counter: the URL's address, database and credentials.
        self._factory = ConnectionPool.from_url(url, socket_timeout=timeout_s,
                                                socket_connect_timeout=timeout_s * 2)
        self._idle: list[AbstractConnection] = []
        self._closed = False
        self._slots = asyncio.Semaphore(max_connections)
        self._timeout_s = timeout_s
        self._max_batch = max_batch
        self._queue: list[tuple[str, int, asyncio.Future[int]]] = []
        self._batches: set[asyncio.Task[None]] = set()
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
                count = await self._incr(rkey, rate.window_s * 1000 + 1000)
                if self.degraded:
                    log.info("rate limiter: Redis is back; shared limits restored")
                    self.degraded = False
                return _decide(count, rate, now)
            except (RedisError, OSError) as exc:
                self._down_until = max(self._down_until, time.time() + self._retry_s)
                if not self.degraded:
                    log.warning("rate limiter: Redis unreachable (%s); using local limits",
                            exc if str(exc) else f"{type(exc).__name__}: no answer in time")
                self.degraded = True
        return await self._fallback.acquire(key, rate)

    def _incr(self, rkey: str, ttl_ms: int) -> asyncio.Future[int]:
        """The key's new count, from the batch this turn of the event loop sends."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        if not self._queue:
            loop.call_soon(self._send_queued)
        self._queue.append((rkey, ttl_ms, fut))
        return fut

    def _send_queued(self) -> None:
        queued, self._queue = self._queue, []
        for i in range(0, len(queued), self._max_batch):
            # A task of its own: a caller that gives up does not abort the others' answers.
            task = asyncio.ensure_future(self._send(queued[i:i + self._max_batch]))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _send(self, batch: list[tuple[str, int, asyncio.Future[int]]]) -> None:
        try:
            counts = await self._run(batch)
        except BaseException as exc:
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception)
                                      else RedisConnectionError("the limiter was stopped"))
            if not isinstance(exc, Exception):
                raise
            return
        for (_, _, fut), count in zip(batch, counts, strict=True):
            if not fut.done():  # its caller may have given up meanwhile
                fut.set_result(count)

    async def _run(self, batch: list[tuple[str, int, asyncio.Future[int]]]) -> list[int]:
        if self._slots.locked():
            try:
                async with asyncio.timeout(self._timeout_s * 4):
                    await self._slots.acquire()
            except TimeoutError:
                raise RedisConnectionError("No connection available.") from None
        else:
            await self._slots.acquire()  # free: returns at once
        commands = [(rkey, ttl_ms) for rkey, ttl_ms, _ in batch]
        try:
            # A connection that sat idle may have been closed by the server meanwhile (a
            # restart, an idle timeout): the commands then never ran, and go once more on a
            # fresh connection; the other idle ones are likely as stale.
            reused = bool(self._idle)
            try:
                return await self._call(commands)
            except RedisConnectionError:
                if not reused:
                    raise
            stale, self._idle = self._idle, []
            for conn in stale:
                await conn.disconnect(nowait=True)
            return await self._call(commands)
        finally:
            self._slots.release()

    async def _call(self, commands: list[tuple[str, int]]) -> list[int]:
        conn = self._idle.pop() if self._idle else self._new_connection()
        try:
            if not conn.is_connected:
                # Connect and handshake under the socket timeouts, as the client does; the
                # commands below are limited as a whole instead (a timeout on each socket
                # write costs a task per write).
                conn.socket_timeout = self._timeout_s
                await conn.connect_check_health(check_health=False)
                conn.socket_timeout = None
            async with asyncio.timeout(self._timeout_s):
                counts = await self._exchange(conn, "EVALSHA", _LUA_SHA, commands)
                missing = [i for i, n in enumerate(counts) if n is None]
                if missing:  # a fresh or flushed Redis: the script goes along, once
                    loaded = await self._exchange(conn, "EVAL", _LUA,
                                                  [commands[i] for i in missing])
                    for i, n in zip(missing, loaded, strict=True):
                        counts[i] = n
        except BaseException:
            # Failed, timed out or cancelled half-way: whatever it still has to say would be
            # read as the answer to the next command.
            await conn.disconnect(nowait=True)
            raise
        if self._closed:
            await conn.disconnect(nowait=True)
        else:
            self._idle.append(conn)
        if any(n is None for n in counts):
            raise RedisError("Redis does not know the rate-limit script it was just given")
        return [int(n) for n in counts if n is not None]

    @staticmethod
    async def _exchange(conn: AbstractConnection, verb: str, script: str,
                        commands: list[tuple[str, int]]) -> list[int | None]:
        """Sends the commands in one write and reads their answers in order; None where Redis
        did not know the script."""
        await conn.send_packed_command(
            conn.pack_commands([(verb, script, 1, rkey, ttl_ms) for rkey, ttl_ms in commands]),
            check_health=False)
        out: list[int | None] = []
        for _ in commands:
            try:
                out.append(int(await conn.read_response()))
            except NoScriptError:  # every answer is still read: the stream stays in step
                out.append(None)
        return out

    def _new_connection(self) -> AbstractConnection:
        return self._factory.connection_class(**self._factory.connection_kwargs)

    async def ping(self) -> None:
        await self._redis.ping()

    async def close(self) -> None:
        self._closed = True
        for task in list(self._batches):  # answers already asked for are still given
            with contextlib.suppress(Exception):
                await task
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.disconnect(nowait=True)
        await self._factory.aclose()
        await self._redis.aclose()
