"""Gateway overhead: the same authenticated GET (`/api/v1/auth/me`) served directly by the user
service and through the gateway, both in distributed mode (own processes, PostgreSQL, Redis
rate limiting), measured in the same run by the same load generator.

    .venv/bin/python bench/gateway_overhead.py [--seconds 8] [--concurrency 32] [--rounds 2]

Two phases per path, interleaved: throughput at `--concurrency` (saturated), and latency with one
request in flight (so the figure is the hop's cost, not queueing behind a saturated CPU).
Prints requests/s and p50/p99 for both paths, the throughput ratio and the p50 added.
Targets: ratio >= 0.70, added p50 < 2 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx

from workbench.testing import (
    ServerProcess,
    create_pg_database,
    drop_pg_database,
    free_port,
    register,
    wait_http,
)

WB = [sys.executable, "-m", "services.cli"]


async def load(url: str, token: str, seconds: float, concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    headers = {"authorization": f"Bearer {token}"}
    deadline = time.perf_counter() + seconds
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as session:

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                async with session.get(url, headers=headers) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "errors": errors,
        "requests": len(latencies),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    # A SIGTERM (e.g. from `timeout`) unwinds through `finally`, so no server is left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    db_name, db_url = asyncio.run(create_pg_database("wb_bench"))
    work = Path(tempfile.mkdtemp(prefix="wb-bench-"))
    user_port, gw_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WB_")}
    env.update({
        "WB_MODE": "distributed", "WB_DATABASE_URL": db_url,
        "WB_SECRET_KEY": "bench-secret-0123456789abcdef",
        "WB_INTERNAL_TOKEN": "bench-internal-0123456789abcd",
        "WB_UPSTREAMS": f'{{"user": "http://127.0.0.1:{user_port}"}}',
        "WB_JWKS_URL": f"http://127.0.0.1:{user_port}/.well-known/jwks.json",
        "WB_ACCESS_LOG": "false", "WB_LOG_LEVEL": "WARNING",
        "WB_RATE_LIMIT_AUTHENTICATED": "100000000/60",
        # Its own Redis db: the anonymous per-IP budget of 127.0.0.1 is not shared with other
        # gateways on the machine (the sign-up below spends it).
        "WB_REDIS_URL": "redis://127.0.0.1:6379/14",
    })
    subprocess.run([*WB, "migrate"], env=env, check=True, capture_output=True)
    procs = [
        ServerProcess([*WB, "serve", "user", "--port", str(user_port)], env, work / "user.log"),
        ServerProcess([*WB, "serve", "gateway", "--port", str(gw_port)], env, work / "gw.log"),
    ]
    try:
        procs[0].start()
        wait_http(f"http://127.0.0.1:{user_port}/readyz", proc=procs[0].proc, log=procs[0].log)
        procs[1].start()
        wait_http(f"http://127.0.0.1:{gw_port}/readyz", proc=procs[1].proc, log=procs[1].log)
        with httpx.Client(base_url=f"http://127.0.0.1:{gw_port}") as c:
            token = register(c).access_token
        direct_url = f"http://127.0.0.1:{user_port}/api/v1/auth/me"
        gateway_url = f"http://127.0.0.1:{gw_port}/api/v1/auth/me"
        for url in (direct_url, gateway_url):  # warm up both paths
            asyncio.run(load(url, token, 1.5, args.concurrency))
        results: dict[str, list[dict[str, float]]] = {"direct": [], "gateway": []}
        latency: dict[str, list[dict[str, float]]] = {"direct": [], "gateway": []}
        paths = {"direct": direct_url, "gateway": gateway_url}
        for _ in range(args.rounds):  # interleaved, so drift affects both alike
            for name, url in paths.items():
                results[name].append(asyncio.run(load(url, token, args.seconds,
                                                      args.concurrency)))
            for name, url in paths.items():
                latency[name].append(asyncio.run(load(url, token, args.seconds / 2, 1)))
    finally:
        for p in reversed(procs):
            p.stop()
        asyncio.run(drop_pg_database(db_name))

    def mean(table: dict[str, list[dict[str, float]]], path: str, key: str) -> float:
        return statistics.fmean(r[key] for r in table[path])

    print(f"gateway overhead — GET /api/v1/auth/me, {args.rounds} rounds x {args.seconds:.0f}s, "
          f"{os.cpu_count()} CPUs")
    print(f"{'path':<10}{'req/s @' + str(args.concurrency):>12}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'│ p50 @1':>10}{'p99 @1':>9}{'errors':>8}")
    for path in ("direct", "gateway"):
        errors = sum(r["errors"] for r in results[path] + latency[path])
        print(f"{path:<10}{mean(results, path, 'rps'):>12.0f}"
              f"{mean(results, path, 'p50_ms'):>9.2f}{mean(results, path, 'p99_ms'):>9.2f}"
              f"{mean(latency, path, 'p50_ms'):>10.2f}{mean(latency, path, 'p99_ms'):>9.2f}"
              f"{errors:>8.0f}")
    ratio = mean(results, "gateway", "rps") / mean(results, "direct", "rps")
    added = mean(latency, "gateway", "p50_ms") - mean(latency, "direct", "p50_ms")
    print(f"throughput ratio (gateway/direct): {ratio:.2f}   (target >= 0.70)")
    print(f"p50 added by the gateway (one request in flight): {added:.2f} ms   (target < 2 ms)")


if __name__ == "__main__":
    main()
