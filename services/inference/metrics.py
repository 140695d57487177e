"""Per-deployment serving metrics: Prometheus series on /metrics (labelled by deployment and
route) and a rolling window of the last requests for `GET …/services/{id}/metrics` (counts,
latency and time-to-first-token percentiles, tokens per second, queue depth)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("wb_inference_requests_total", "Model requests",
                   ["deployment", "route", "endpoint", "outcome"])
LATENCY = Histogram("wb_inference_request_seconds", "Model request latency", ["deployment"],
                    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
TTFT = Histogram("wb_inference_time_to_first_token_seconds", "Time to first token (streams)",
                 ["deployment"], buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10))
TOKENS = Counter("wb_inference_tokens_total", "Tokens", ["deployment", "kind"])
QUEUE = Gauge("wb_inference_queue_depth", "Requests waiting in the replicas", ["deployment"])
WINDOW = 2000


@dataclass
class _Sample:
    at: float
    ok: bool
    latency_s: float
    ttft_s: float | None
    completion_tokens: int
    generation_s: float
    route: str | None


@dataclass
class DeploymentMetrics:
    samples: deque[_Sample] = field(default_factory=lambda: deque(maxlen=WINDOW))
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    by_route: dict[str, list[int]] = field(default_factory=dict)  # route -> [requests, errors]


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return round(values[k] * 1000, 2)


class Metrics:
    def __init__(self) -> None:
        self._by_deployment: dict[str, DeploymentMetrics] = {}

    def record(self, deployment_id: str, *, route: str | None, endpoint: str, ok: bool,
               latency_s: float, ttft_s: float | None = None, prompt_tokens: int = 0,
               completion_tokens: int = 0) -> None:
        m = self._by_deployment.setdefault(deployment_id, DeploymentMetrics())
        m.requests += 1
        m.errors += 0 if ok else 1
        m.prompt_tokens += prompt_tokens
        m.completion_tokens += completion_tokens
        if route:
            counts = m.by_route.setdefault(route, [0, 0])
            counts[0] += 1
            counts[1] += 0 if ok else 1
        generation = latency_s - (ttft_s or 0.0)
        m.samples.append(_Sample(time.time(), ok, latency_s, ttft_s, completion_tokens,
                                 generation, route))
        REQUESTS.labels(deployment_id, route or "", endpoint, "ok" if ok else "error").inc()
        LATENCY.labels(deployment_id).observe(latency_s)
        if ttft_s is not None:
            TTFT.labels(deployment_id).observe(ttft_s)
        if prompt_tokens:
            TOKENS.labels(deployment_id, "prompt").inc(prompt_tokens)
        if completion_tokens:
            TOKENS.labels(deployment_id, "completion").inc(completion_tokens)

    def queue_depth(self, deployment_id: str, depth: int) -> None:
        QUEUE.labels(deployment_id).set(depth)

    def snapshot(self, deployment_id: str, *, queue_depth: int) -> dict[str, Any]:
        m = self._by_deployment.get(deployment_id, DeploymentMetrics())
        ok = [s for s in m.samples if s.ok]
        latencies = [s.latency_s for s in ok]
        ttfts = [s.ttft_s for s in ok if s.ttft_s is not None]
        gen_tokens = sum(s.completion_tokens for s in ok)
        gen_time = sum(s.generation_s for s in ok if s.completion_tokens)
        return {
            "requests": m.requests, "errors": m.errors,
            "error_rate": round(m.errors / m.requests, 4) if m.requests else 0.0,
            "prompt_tokens": m.prompt_tokens, "completion_tokens": m.completion_tokens,
            "latency_ms": {"p50": _pct(latencies, 50), "p95": _pct(latencies, 95),
                           "p99": _pct(latencies, 99)},
            "time_to_first_token_ms": {"p50": _pct(ttfts, 50), "p95": _pct(ttfts, 95),
                                       "p99": _pct(ttfts, 99)},
            "tokens_per_s": round(gen_tokens / gen_time, 2) if gen_time > 0 else None,
            "queue_depth": queue_depth, "window": len(m.samples),
            "by_route": {r: {"requests": c[0], "errors": c[1]} for r, c in m.by_route.items()},
        }
